"""index.html: one row per case with the reference photos, the prompt, the outputs, their final
masks and the per-step mask evolution. Plain HTML and CSS, images referenced by relative path."""

from __future__ import annotations

import html
import re
from pathlib import Path

from PIL import Image

from realcustom.eval.dreambench import Subject
from realcustom.eval.harness import METRICS, load_photo

THUMBNAIL = 256
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
table.summary { border-collapse: collapse; margin-bottom: 1rem; }
table.summary td, table.summary th { border: 1px solid #ccc; padding: .25rem .5rem; text-align: right; }
.case { display: flex; gap: 1rem; align-items: flex-start; border-top: 1px solid #ddd; padding: .75rem 0; }
.refs img, .output img { width: 128px; height: 128px; object-fit: cover; display: block; }
.output { display: flex; flex-direction: column; gap: .25rem; max-width: 280px; }
.masks { display: flex; gap: .25rem; }
.masks img { width: 62px; height: 62px; image-rendering: pixelated; }
.steps { font-size: .75rem; color: #555; }
.steps img { height: 40px; width: auto; image-rendering: pixelated; display: block; }
.prompt b { color: #b3261e; }
.scores { font-size: .8rem; color: #555; }
.warning { background: #fff3cd; padding: .5rem; border: 1px solid #e0c36a; }
"""


def save_references(out: Path, subjects: list[Subject]) -> dict[str, str]:
    """Thumbnail of each subject's reference photo under OUT/references/ -> relative paths."""
    folder = out / "references"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for subject in subjects:
        path = folder / f"{subject.name}.jpg"
        if not path.is_file():
            photo = load_photo(subject.reference)
            photo.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS)
            photo.save(path, quality=90)
        paths[subject.name] = f"references/{subject.name}.jpg"
    return paths


def highlight(prompt: str, targets: list[str]) -> str:
    """The prompt with its target words in bold (escaped first, so the markup stays ours)."""
    text = html.escape(prompt)
    for target in sorted(set(targets), key=len, reverse=True):
        text = re.sub(rf"\b{re.escape(html.escape(target))}\b", lambda m: f"<b>{m[0]}</b>", text)
    return text


def _case_html(record: dict, references: dict[str, str]) -> str:
    refs = "".join(
        f'<img src="{references[name]}" alt="reference {html.escape(name)}" title="{html.escape(name)}">'
        for name in record["subjects"]
    )
    outputs = []
    for k, image in enumerate(record["images"]):
        masks = "".join(f'<img src="{path}" alt="mask">' for path in record["masks"][k])
        steps = "".join(
            f'<div class="steps"><span>{html.escape(target)}, per step:</span>'
            f'<img src="{path}" alt="mask evolution of {html.escape(target)}"></div>'
            for target, path in zip(record["targets"], record["mask_steps"][k], strict=False)
        )
        scores = " · ".join(f"{metric} {record['scores'][metric][k]:.1f}" for metric in METRICS)
        outputs.append(
            f'<div class="output"><img src="{image}" alt="output {k}"><div class="masks">{masks}</div>'
            f'{steps}<div class="scores">{scores}</div></div>'
        )
    return (
        f'<div class="case" id="{html.escape(record["id"])}"><div class="refs">{refs}</div>'
        f'<div><div class="prompt">{highlight(record["prompt"], record["targets"])}</div>'
        f'<div class="scores">seed {record["seed"]}</div></div>{"".join(outputs)}</div>'
    )


def _summary_html(summary: dict) -> str:
    rows = "".join(
        f"<tr><th>{protocol}</th>"
        + "".join(f"<td>{result['overall'][m]:.2f}</td>" for m in METRICS)
        + "</tr>"
        for protocol, result in summary.items()
    )
    head = "<tr><th></th>" + "".join(f"<th>{m}</th>" for m in METRICS) + "</tr>"
    return f'<table class="summary">{head}{rows}</table>'


def write_gallery(out: Path, results: dict, subjects: list[Subject]) -> Path:
    references = save_references(out, subjects)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>RealCustom++ DreamBench evaluation</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>RealCustom++ DreamBench evaluation</h1>",
        f"<p>Model <code>{html.escape(results['config']['model'])}</code>. Masks: final mask per subject; "
        "the strip below shows the mask at each step it was recomputed. Scores in %.</p>",
    ]
    if results["random_weights"]:
        parts.append('<p class="warning">Random weights: images and scores are meaningless.</p>')
    parts.append(_summary_html(results["summary"]))
    for protocol in results["summary"]:
        parts.append(f"<h2>{protocol}</h2>")
        parts += [_case_html(r, references) for r in results["cases"] if r["protocol"] == protocol]
    parts.append("</body></html>")
    path = out / "index.html"
    path.write_text("\n".join(parts))
    return path
