"""The learned detector end to end on a tiny random model (imported from a synthetic GGUF through
the real loading path) and real paragraphs of this machine's /usr/share/doc: the data set
(length-matched pairs, package splits, a manifest that catches a changed file), training, the
ONNX file against torch, the refusal of a detector made for other weights, and PAWN served
through a real scoring server."""

from __future__ import annotations

import json

import grpc
import pytest
import torch
from servers import ServerThread

from services.core.engine import Engine
from services.core.errors import FailedPrecondition
from services.core.scoring.runner import Text, score_texts
from services.core.tokenizer import Tokenizer
from services.runtime.errors import status_details
from services.runtime.settings import ServerSettings
from services.scoring.convert import start_token_id
from services.scoring.detector import CONFIG_FILE, load_detector
from services.scoring.server import load_scoring, start_scoring
from services.scoring.training import detector_data, detector_train
from specmesh.v1 import common_pb2, scoring_pb2, scoring_pb2_grpc

S = scoring_pb2
PER_SPLIT = 6


@pytest.fixture(scope="module")
def trained(tiny_gguf, tmp_path_factory):
    from services.core import model_import as mi

    root = tmp_path_factory.mktemp("detector-models")
    model_dir = mi.import_gguf(tiny_gguf().path, "tiny", root=root, progress=False)
    other_dir = mi.import_gguf(tiny_gguf(untied=True).path, "tiny-other", root=root, progress=False)
    paragraphs = detector_data.human_paragraphs()
    chosen = [p for s in detector_data.SPLITS for p in paragraphs if detector_data.split_of(p.document) == s]
    by_split = {
        s: [p for p in chosen if detector_data.split_of(p.document) == s][:PER_SPLIT]
        for s in detector_data.SPLITS
    }
    if any(len(v) < 2 for v in by_split.values()):
        pytest.fail(
            "/usr/share/doc has too few prose paragraphs per split: "
            + str({k: len(v) for k, v in by_split.items()})
        )
    tokenizer = Tokenizer.from_dir(model_dir)
    engine = Engine.from_dir(model_dir)
    data_dir = tmp_path_factory.mktemp("detector-data") / "data"
    config = detector_data.DataConfig("tiny", None)
    manifest = detector_data.build(
        data_dir, config, engine, tokenizer, None, [p for v in by_split.values() for p in v]
    )
    out = data_dir.parent / "detector"
    meta = detector_train.run(
        model_dir,
        engine,
        tokenizer,
        data_dir,
        manifest,
        out,
        detector_train.TrainConfig(epochs=3, width=8),
        lambda desc, total: lambda n: None,
    )
    return model_dir, other_dir, engine, tokenizer, data_dir, out, meta


def test_the_data_set_pairs_human_and_machine_text_of_one_length(trained) -> None:
    model_dir, _, _, tokenizer, data_dir, _, _ = trained
    manifest = detector_data.verify(data_dir)
    assert manifest is not None and set(manifest["files"]) == {"train.jsonl", "val.jsonl", "test.jsonl"}
    for split in detector_data.SPLITS:
        rows = detector_data.read_jsonl(data_dir / f"{split}.jsonl")
        assert rows and all(detector_data.split_of(r["document"]) == split for r in rows)
        for human, machine in zip(rows[::2], rows[1::2], strict=True):
            assert (human["label"], machine["label"], machine["generator"]) == (0, 1, "tiny")
            # one length as generated; the human text re-encodes to exactly its tokens (a random
            # model's byte tokens need not form valid UTF-8, so its text may not)
            n = human["tokens"]
            assert machine["tokens"] == n and len(tokenizer.encode(human["text"])) == n
            opening = tokenizer.decode(tokenizer.encode(human["text"])[: detector_data.OPENING_TOKENS])
            assert machine["text"].startswith(opening[:-1]) and machine["text"] != human["text"]
    views = detector_data.write_bench_views(data_dir)
    assert [v.name for v in views] == ["test_human.jsonl", "test_machine.jsonl"]
    test_rows = detector_data.read_jsonl(data_dir / "test.jsonl")
    assert [r["text"] for r in detector_data.read_jsonl(views[1])] == [
        r["text"] for r in test_rows if r["label"]
    ]
    # a changed file no longer matches its manifest: the data set is rebuilt, not trusted
    path = data_dir / "val.jsonl"
    path.write_text(path.read_text() + "\n")
    assert detector_data.verify(data_dir) is None


def test_onnx_and_torch_agree_and_other_weights_are_refused(trained) -> None:
    model_dir, other_dir, engine, tokenizer, data_dir, out, meta = trained
    assert meta["onnx_torch_max_abs_diff"] <= 1e-4
    assert set(meta["report"]) == {"train", "val", "test"}
    assert {"learned", "log_likelihood", "fast_detectgpt"} <= set(meta["report"]["test"])
    texts = [r["text"] for r in detector_data.read_jsonl(data_dir / "test.jsonl")]
    feats = score_texts(
        engine, [Text(tokenizer.encode(t), hidden=True) for t in texts], start_token_id(tokenizer)
    )
    onnx = load_detector(out, engine, model_dir, backend="onnxruntime").logits(feats)
    ref = load_detector(out, engine, model_dir, backend="torch").logits(feats)
    assert max(abs(a - b) for a, b in zip(onnx, ref, strict=True)) <= 1e-4
    # batched with padding or one at a time: the same logits
    alone = [load_detector(out, engine, model_dir, backend="torch").logits([f])[0] for f in feats]
    assert max(abs(a - b) for a, b in zip(alone, ref, strict=True)) <= 1e-5

    other = Engine.from_dir(other_dir)
    with pytest.raises(FailedPrecondition, match="trained for other weights.*specmesh train detector"):
        load_detector(out, other, other_dir)
    broken = json.loads((out / CONFIG_FILE).read_text()) | {"format": "something else"}
    (out.parent / "broken").mkdir()
    (out.parent / "broken" / CONFIG_FILE).write_text(json.dumps(broken))
    with pytest.raises(FailedPrecondition, match="not a specmesh-detector/1 file"):
        load_detector(out.parent / "broken", engine, model_dir)


def test_pawn_through_a_real_scoring_server(trained) -> None:
    model_dir, _, _, _, _, out, _ = trained
    with_detector = load_scoring(str(model_dir), pack_weights=False, detector=out)
    without = load_scoring(str(model_dir), pack_weights=False, detector=False)
    settings = ServerSettings(host="127.0.0.1", port=0)
    try:
        with (
            ServerThread(lambda: start_scoring(with_detector, settings)) as a,
            ServerThread(lambda: start_scoring(without, settings)) as b,
            grpc.insecure_channel(a.address) as ca,
            grpc.insecure_channel(b.address) as cb,
        ):
            stub = scoring_pb2_grpc.ScoringServiceStub(ca)
            text = common_pb2.Prompt(text="the wind in the trees is a thin, high voice.")
            reply = stub.Detect(S.DetectRequest(input=text), timeout=60)
            (pawn,) = [s for s in reply.scores if s.method == S.DETECT_METHOD_PAWN]  # offered by default
            assert pawn.higher_means_machine and 0.0 < pawn.machine_probability < 1.0
            assert pawn.machine_probability == pytest.approx(float(torch.sigmoid(torch.tensor(pawn.score))))
            one = stub.Detect(
                S.DetectRequest(input=common_pb2.Prompt(text="a"), methods=[S.DETECT_METHOD_PAWN]), timeout=60
            )
            assert len(one.token_ids) == 1 and len(one.scores) == 1
            plain = scoring_pb2_grpc.ScoringServiceStub(cb)
            assert S.DETECT_METHOD_PAWN not in {
                s.method for s in plain.Detect(S.DetectRequest(input=text)).scores
            }
            with pytest.raises(grpc.RpcError) as e:
                plain.Detect(S.DetectRequest(input=text, methods=[S.DETECT_METHOD_PAWN]), timeout=60)
            code, message, violations = status_details(e.value)
            assert code == grpc.StatusCode.FAILED_PRECONDITION and [v.field for v in violations] == [
                "methods"
            ]
            assert "specmesh train detector" in message
    finally:
        with_detector.close()
        without.close()
