"""results.json and results.md: the means of every metric, in the layout of the paper's Table 1."""

from __future__ import annotations

import json
from pathlib import Path

from realcustom.eval.harness import METRICS, RunConfig

# RealCustom++ rows of Table 1 (July 2024 draft of arXiv 2408.09744, §4.1), for
# putting this run's numbers side by side. IR is ImageReward.
PAPER_ROWS = (
    (
        "SD-v1.5",
        {
            "CLIP-B-T": 31.92,
            "CLIP-L-T": 28.72,
            "IR": 0.7628,
            "CLIP-B-I": 86.36,
            "CLIP-L-I": 84.16,
            "DINO-I": 73.14,
        },
    ),
    (
        "SDXL",
        {
            "CLIP-B-T": 33.43,
            "CLIP-L-T": 31.20,
            "IR": 1.1036,
            "CLIP-B-I": 87.32,
            "CLIP-L-I": 86.67,
            "DINO-I": 74.60,
        },
    ),
)
TABLE_COLUMNS = ("CLIP-B-T", "CLIP-L-T", "IR", "CLIP-B-I", "CLIP-L-I", "DINO-I")
IR_FOOTNOTE = (
    "IR (ImageReward) is not computed: it needs the ImageReward reward model, which this harness "
    "does not load (no weights available offline). It is shown as n/a."
)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarise(records: list[dict]) -> dict:
    """Per protocol: overall means (every image weighs the same), per-case-group and per-subject
    means, and the number of images."""
    summary = {}
    for protocol in dict.fromkeys(record["protocol"] for record in records):  # run order
        chosen = [record for record in records if record["protocol"] == protocol]
        groups: dict[str, dict[str, list[float]]] = {}
        subjects: dict[str, dict[str, list[float]]] = {}
        for record in chosen:
            group = groups.setdefault("+".join(record["subjects"]), {metric: [] for metric in METRICS})
            for metric in METRICS:
                group[metric].extend(record["scores"][metric])
            for name, scores in record["subject_scores"].items():
                entry = subjects.setdefault(name, {metric: [] for metric in scores})
                for metric, values in scores.items():
                    entry[metric].extend(values)
        summary[protocol] = {
            "images": sum(len(record["images"]) for record in chosen),
            "cases": len(chosen),
            "overall": {m: _mean([v for r in chosen for v in r["scores"][m]]) for m in METRICS},
            "per_group": {name: {m: _mean(v) for m, v in scores.items()} for name, scores in groups.items()},
            "per_subject": {
                name: {m: _mean(v) for m, v in scores.items()} for name, scores in subjects.items()
            },
        }
    return summary


def _row(method: str, base: str, values: dict[str, float], ir: str) -> str:
    cells = [ir if column == "IR" else f"{values[column]:.2f}" for column in TABLE_COLUMNS]
    return f"| {method} | {base} | " + " | ".join(cells) + " |"


def markdown(config: RunConfig, summary: dict, random_weights: bool) -> str:
    header = "| Method | Base | " + " | ".join(TABLE_COLUMNS) + " |"
    rule = "|---|---|" + "---|" * len(TABLE_COLUMNS)
    lines = ["# DreamBench evaluation", ""]
    if random_weights:
        lines += [
            "> **Random weights:** the generator and/or the metric models are tiny random-weight "
            "stand-ins. These numbers check the harness only and say nothing about quality.",
            "",
        ]
    sampling = config.sampling
    lines += [
        f"Model `{config.model}`; {sampling.size}x{sampling.size} px, {sampling.steps} steps, guidance "
        f"{sampling.guidance_scale}, mask scope {sampling.mask_scope}, mask reused after step "
        f"{sampling.mask_reused_step}; {config.images_per_prompt} image(s) per prompt, seeds "
        f"{config.base_seed} + prompt index. Metric models: CLIP-B `{config.metric_models['clip_b']}`, "
        f"CLIP-L `{config.metric_models['clip_l']}`, DINO `{config.metric_models['dino']}`. "
        "All scores are cosine similarities in %.",
        "",
    ]
    titles = {
        "single": "Single subject (layout of the paper's Table 1)",
        "multi": "Multi-subject (similarity inside each subject's mask region, mean over subjects)",
    }
    for protocol, result in summary.items():
        lines += [
            f"## {titles[protocol]}",
            "",
            f"{result['cases']} cases (prompt x {'subject' if protocol == 'single' else 'pair'}), "
            f"{result['images']} images.",
            "",
            header,
            rule,
            _row("RealCustom++ (this run)", config.model, result["overall"], "n/a¹"),
        ]
        if protocol == "single":
            lines += [_row("RealCustom++ (paper)", base, row, f"{row['IR']:.4f}") for base, row in PAPER_ROWS]
        lines += ["", f"¹ {IR_FOOTNOTE}", "", f"### Per {'subject' if protocol == 'single' else 'pair'}", ""]
        lines += ["| Subject | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
        for name, scores in result["per_group"].items():
            lines.append(f"| {name} | " + " | ".join(f"{scores[m]:.2f}" for m in METRICS) + " |")
        lines.append("")
    return "\n".join(lines)


def write_results(out: Path, config: RunConfig, records: list[dict], random_weights: bool) -> dict:
    summary = summarise(records)
    results = {
        "config": config.to_json(),
        "random_weights": random_weights,
        "note": IR_FOOTNOTE,
        "summary": summary,
        "cases": records,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(config, summary, random_weights))
    return results
