"""Telemetry names and instruments of the gateway (OpenTelemetry GenAI conventions + specmesh.*)."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry import metrics, trace

from services.runtime.telemetry import Telemetry

SCOPE = "specmesh.gateway"  # instrumentation scope of the gateway's spans and metrics

# spans
REQUEST_SPAN = "specmesh.generate"
ROUND_SPAN = "specmesh.round"

# span / metric attributes
OPERATION = "gen_ai.operation.name"
REQUEST_MODEL = "gen_ai.request.model"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
REQUEST_TEMPERATURE = "gen_ai.request.temperature"
REQUEST_TOP_P = "gen_ai.request.top_p"
REQUEST_TOP_K = "gen_ai.request.top_k"
REQUEST_SEED = "gen_ai.request.seed"
RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
POLICY = "specmesh.policy"
STRATEGY = "specmesh.spec.strategy"
SESSION_ID = "specmesh.session_id"
ROUND = "specmesh.round"
DRAFTED = "specmesh.spec.drafted"
ACCEPTED_LEN = "specmesh.spec.accepted_len"
EMITTED = "specmesh.spec.emitted"
BUDGET_NODES = "specmesh.spec.budget.max_nodes"
BUDGET_DEPTH = "specmesh.spec.budget.max_depth"
ROUNDS = "specmesh.spec.rounds"
TAU = "specmesh.spec.mean_accepted_length"
ACCEPTANCE_RATE = "specmesh.spec.acceptance_rate"

# metrics
TIME_TO_FIRST_TOKEN = "gen_ai.server.time_to_first_token"
TIME_PER_OUTPUT_TOKEN = "gen_ai.server.time_per_output_token"
REQUEST_DURATION = "gen_ai.server.request.duration"
ACCEPTED_LENGTH = "specmesh.spec.accepted_length"
SESSION_STORE_ERRORS = "specmesh.session_store.errors"
RESUMED = "specmesh.resumed"  # span attribute: the request resumed an earlier stream
# span attributes: no draft replica answered, so the round ran on the target alone
# policy auto, on the request span: the policy it chose and why
AUTO_POLICY = "specmesh.auto.policy"
AUTO_REASON = "specmesh.auto.reason"
# policy r2r, on the request span (running totals)
ROUTE_THRESHOLD = "specmesh.route.threshold"
ROUTE_ROUTER_CALLS = "specmesh.route.router_calls"
ROUTE_TARGET_TOKENS = "specmesh.route.target_tokens"
ROUTE_DRAFT_TOKENS = "specmesh.route.draft_tokens"
ROUTE_CATCH_UP_TOKENS = "specmesh.route.catch_up_tokens"
DRAFT_FALLBACK = "specmesh.spec.draft_fallback"
TARGET_BUSY = "specmesh.spec.target_busy"  # round ran on the target alone: it held too many streams
DRAFT_FALLBACK_ROUNDS = "specmesh.spec.draft_fallback_rounds"

# bucket boundaries recommended by the GenAI semantic conventions
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
_ACCEPTED_BUCKETS = tuple(float(i) for i in range(17)) + (24.0, 32.0)


@dataclass
class Instruments:
    tracer: trace.Tracer
    time_to_first_token: metrics.Histogram
    time_per_output_token: metrics.Histogram
    request_duration: metrics.Histogram
    accepted_length: metrics.Histogram
    session_store_errors: metrics.Counter


def instruments(telemetry: Telemetry | None) -> Instruments:
    """Tracer and histograms from `telemetry` (else the global OpenTelemetry providers)."""
    if telemetry is not None:
        tracer, meter = telemetry.tracer(SCOPE), telemetry.meter(SCOPE)
    else:
        tracer, meter = trace.get_tracer(SCOPE), metrics.get_meter(SCOPE)
    return Instruments(
        tracer=tracer,
        time_to_first_token=meter.create_histogram(
            TIME_TO_FIRST_TOKEN,
            unit="s",
            description="Time from request arrival to the first output token",
            explicit_bucket_boundaries_advisory=list(_TTFT_BUCKETS),
        ),
        time_per_output_token=meter.create_histogram(
            TIME_PER_OUTPUT_TOKEN,
            unit="s",
            description="Time per output token after the first one",
            explicit_bucket_boundaries_advisory=list(_TPOT_BUCKETS),
        ),
        request_duration=meter.create_histogram(
            REQUEST_DURATION,
            unit="s",
            description="Duration of a generation request",
            explicit_bucket_boundaries_advisory=list(_DURATION_BUCKETS),
        ),
        accepted_length=meter.create_histogram(
            ACCEPTED_LENGTH,
            unit="{token}",
            description="Draft tokens accepted per verification round (without the correction/bonus token)",
            explicit_bucket_boundaries_advisory=list(_ACCEPTED_BUCKETS),
        ),
        session_store_errors=meter.create_counter(
            SESSION_STORE_ERRORS,
            unit="{error}",
            description="Session-store operations that failed (Redis unreachable); streams stay up",
        ),
    )
