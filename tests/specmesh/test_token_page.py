"""The token page (`specmesh attribute|uncertainty --html`): one self-contained file, checked
as markup and then in a real headless Chromium (tests/browser.py): real mouse hovers, the heat
map's colours against the numbers the service returned, hostile token text shown as text, and a
screenshot."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from browser import HeadlessPage, chromium

from specmesh import token_page
from specmesh.cli.main import main

HOSTILE = "the wind </script><script>window.pwned = 1</script> <b>bold</b> &amp;"


@pytest.fixture(scope="module")
def page():
    with HeadlessPage(chromium()) as p:
        yield p


def _alpha(css: str) -> float:
    """The alpha of an `rgba(r, g, b, a)` / `rgb(r, g, b)` colour. The browser keeps it in 8 bits,
    hence the tests' tolerance of a little over 1/255."""
    parts = re.findall(r"[\d.]+", css)
    return float(parts[3]) if len(parts) == 4 else 1.0


def _backgrounds(page: HeadlessPage, selector: str) -> list[float]:
    return page.evaluate(
        f"[...document.querySelectorAll({json.dumps(selector)})]"
        ".map(e => getComputedStyle(e).backgroundColor)"
    )


def _details(page: HeadlessPage, which: str) -> str:
    return page.evaluate(f"document.getElementById('{which}-details').textContent")


def test_the_page_is_one_file_whose_data_cannot_break_out() -> None:
    data = {"start": 0, "tokens": [{"text": HOSTILE, "probability": 0.5, "entropy": 1.0, "kurtosis": 2.0}]}
    html = token_page.render("__DATA__ <i>", "m", uncertainty=data)
    assert html.count("</script>") == 2  # the page's own two scripts; the token's is escaped
    assert "<b>" not in html and "&lt;i&gt;" in html and "<h1>__DATA__" in html
    assert not re.search(r"\b(src|href)=|https?://", html)  # nothing loaded from elsewhere
    with pytest.raises(ValueError, match="attribution or uncertainty"):
        token_page.render("t")


def test_attribution_page_in_a_browser(tiny_model, page, tmp_path, capsys) -> None:
    out = tmp_path / "attribution.html"
    argv = ["attribute", "--model", tiny_model, "--no-chat", "--prompt", HOSTILE]
    assert main([*argv, "--max-new-tokens", "3", "--json", "--html", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    page.open(out)

    context = "#attribution .context .tok"
    texts = page.evaluate(f"[...document.querySelectorAll('{context}')].map(e => e.textContent)")
    assert [t.replace("\u21b5", "") for t in texts] == [t["text"] or "\u2205" for t in result["context"]]
    assert page.evaluate("typeof window.pwned") == "undefined"  # the prompt's script is text
    assert page.evaluate("document.querySelectorAll('#attribution b').length") == 0

    for j, attribution in enumerate(result["attributions"]):
        page.hover(f"#attribution .target .tok[data-index='{j}']")
        assert _details(page, "attribution").startswith(f"generated #{j} ")
        # the heat map is this token's importance, scaled to its largest value
        importance = np.maximum(np.array(attribution["importance"]), 0)
        alphas = np.array([_alpha(c) for c in _backgrounds(page, context)])
        np.testing.assert_allclose(alphas, importance / importance.max(), atol=5e-3)

    top = int(np.argmax(result["attributions"][-1]["importance"]))
    page.hover(f"{context}[data-index='{top}']")
    value = result["attributions"][-1]["importance"][top]
    shown = _details(page, "attribution")
    assert shown.startswith(f"context #{top} ")
    assert float(re.search(r"importance (\S+)", shown).group(1)) == pytest.approx(value, rel=1e-3)

    # a click keeps the choice while the pointer moves over other generated tokens
    page.click("#attribution .target .tok[data-index='0']")
    page.hover("#attribution .target .tok[data-index='2']")
    assert _details(page, "attribution").startswith("generated #0 ")

    shot = page.screenshot(tmp_path / "attribution.png")
    _assert_heat_map_drawn(shot.read_bytes())


def test_signed_importance_is_blue_below_zero(tiny_model, page, tmp_path, capsys) -> None:
    out = tmp_path / "gradient.html"
    argv = ["attribute", "--model", tiny_model, "--no-chat", "--prompt", "the wind in the trees"]
    assert (
        main([*argv, "--target", " and", "--method", "gradient_x_input", "--json", "--html", str(out)]) == 0
    )
    importance = np.array(json.loads(capsys.readouterr().out)["attributions"][0]["importance"])
    assert (importance < 0).any() and (importance > 0).any()
    page.open(out)
    colours = _backgrounds(page, "#attribution .context .tok")
    alphas = np.array([_alpha(c) for c in colours])
    np.testing.assert_allclose(alphas, np.abs(importance) / np.abs(importance).max(), atol=5e-3)
    blue = np.array([c.startswith("rgba(40, 90, 220") or c.startswith("rgb(40, 90, 220") for c in colours])
    np.testing.assert_array_equal(blue[alphas > 0], importance[alphas > 0] < 0)


def test_uncertainty_page_in_a_browser(tiny_model, page, tmp_path, capsys) -> None:
    out = tmp_path / "uncertainty.html"
    argv = ["uncertainty", "--model", tiny_model, "--text", "a dog and a cat sat on the mat", "--start", "1"]
    assert main([*argv, "--json", "--html", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    page.open(out)

    tokens = "#uncertainty .tok"
    probability = np.array([t["probability"] for t in result["tokens"]])
    alphas = np.array([_alpha(c) for c in _backgrounds(page, tokens)])
    np.testing.assert_allclose(alphas, 1 - probability, atol=5e-3)  # default colour: 1 - p

    page.evaluate(
        "(() => { const s = document.getElementById('uncertainty-metric'); s.value = 'entropy';"
        " s.dispatchEvent(new Event('change')); })()"
    )
    entropy = np.array([t["entropy"] for t in result["tokens"]])
    alphas = np.array([_alpha(c) for c in _backgrounds(page, tokens)])
    np.testing.assert_allclose(alphas, entropy / entropy.max(), atol=5e-3)

    page.hover(f"{tokens}[data-index='2']")
    token = result["tokens"][2]
    shown = _details(page, "uncertainty")
    assert shown.startswith(f"token #3 {json.dumps(token['text'])}: ")
    values = re.search(r"p (\S+), entropy (\S+) nats, kurtosis (\S+)$", shown).groups()
    expected = [token["probability"], token["entropy"], token["kurtosis"]]
    assert [float(v) for v in values] == pytest.approx(expected, rel=1e-3)
    _assert_heat_map_drawn(page.screenshot(tmp_path / "uncertainty.png").read_bytes())


def _assert_heat_map_drawn(png: bytes) -> None:
    """The screenshot is a real page: text on white, with warm heat-map pixels in it."""
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert rgb.shape[0] >= 300 and rgb.shape[1] >= 600
    white = (rgb > 245).all(axis=2).mean()
    warm = ((rgb[..., 0] > 150) & (rgb[..., 0] - rgb[..., 2] > 60)).sum()
    assert 0.5 < white < 0.99 and warm > 50
