"""Stage report: one HTML page (plus PNGs) that says how the run went.

Sections: the metrics of every model side by side (SASRec and E4SRec, full and sampled, with the
published numbers for the dataset where the paper has some), the training curves, the metrics by
history length, and the deploy verdict with the registry's alias history. The page embeds its images,
so the single file can be mailed or opened from MLflow; the PNGs are saved beside it too.
"""

from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path
from typing import Any

from e4srec import contracts as c
from e4srec import published
from e4srec.contracts import METRIC_NAMES, PROTOCOLS
from e4srec.errors import E4SRecError
from e4srec.evaluate import DEFAULT_LENGTH_EDGES, length_group_labels
from e4srec.outputs import preflight, staged_output
from e4srec.storage import fetch
from e4srec.tracking import Tracker, tracked
from e4srec.trained import LABELS, read_config

STAGE = "report"
PAGE = "report.html"
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0} th,td{padding:.25em .7em;text-align:right;border-bottom:1px solid #eee}
th:first-child,td:first-child,th:nth-child(2),td:nth-child(2){text-align:left}
tr.published td{color:#666;font-style:italic} .muted{color:#666} img{max-width:100%}
.verdict{padding:.6em 1em;border-radius:6px;display:inline-block}
.promote{background:#e6f4ea;border:1px solid #9ad0a5} .hold{background:#fdf2e2;border:1px solid #f0c67a}
"""


def _png(fig: Any, out: Path, name: str) -> str:
    """Save the figure as PNG beside the page and return an <img> with it embedded."""
    from e4srec.plots import plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    (out / name).write_bytes(buf.getvalue())
    return f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _table(rows: dict[str, dict[str, float]], splits: tuple[str, ...] = ("valid", "test")) -> str:
    head = "".join(f"<th>{m}</th>" for m in METRIC_NAMES)
    body = []
    for name, metrics in rows.items():
        cls = ' class="published"' if "paper" in name or "S3-Rec" in name else ""
        for split in splits:
            for protocol in PROTOCOLS:
                keys = [f"{split}/{protocol}/{m}" for m in METRIC_NAMES]
                if not any(k in metrics for k in keys):
                    continue
                cells = "".join(f"<td>{metrics[k]:.4f}</td>" if k in metrics else "<td>–</td>" for k in keys)
                body.append(f"<tr{cls}><td>{html.escape(name)}</td><td>{split} / {protocol}</td>{cells}</tr>")
    return f"<table><tr><th>model</th><th>split / protocol</th>{head}</tr>{''.join(body)}</table>"


def _comparison(rows: dict[str, dict[str, float]]) -> Any:
    from e4srec.plots import plt

    keys = ["test/full/HR@10", "test/full/NDCG@10", "test/sampled/HR@10", "test/sampled/NDCG@10"]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.3))
    colors = ["#4C72B0", "#DD8452", "#8C8C8C", "#B0B0B0", "#CCCCCC"]
    for ax, key in zip(axes, keys):
        names = [n for n in rows if key in rows[n]]
        ax.bar(range(len(names)), [rows[n][key] for n in names], color=colors[: len(names)])
        ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=7)
        ax.set_title(key.replace("test/", ""))
    fig.tight_layout()
    return fig


def _by_length(groups: dict[str, dict[str, dict[str, float]]], metric: str = "NDCG@10") -> Any:
    from e4srec.plots import plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.4))
    for ax, protocol in zip(axes, PROTOCOLS):
        present = next(iter(groups.values()))[protocol]
        # JSON files keep keys sorted as strings ("10-19" before "5-9"): restore the numeric order
        labels = [lab for lab in length_group_labels(DEFAULT_LENGTH_EDGES) if lab in present]
        labels += [lab for lab in present if lab not in labels]
        width = 0.8 / len(groups)
        for i, (name, g) in enumerate(groups.items()):
            ax.bar([x + i * width for x in range(len(labels))], [g[protocol][lab][metric] for lab in labels],
                   width=width, label=name)
        users = next(iter(groups.values()))[protocol]
        ax.set_xticks([x + width * (len(groups) - 1) / 2 for x in range(len(labels))],
                      [f"{lab}\n({users[lab]['users']:,})" for lab in labels], fontsize=8)
        ax.set(title=f"test, {protocol} ranking", ylabel=metric, xlabel="history length (users)")
        ax.legend()
    fig.tight_layout()
    return fig


def _gate_table(verdict: dict) -> str:
    """The three scores the gate compared, on the same users, with the registered versions."""
    rows = [(f"this run's {LABELS[kind]}", verdict["versions"].get(kind, ""), verdict["scores"][kind])
            for kind in ("e4srec", "sasrec") if kind in verdict.get("scores", {})]
    if verdict.get("champion_version"):
        value = verdict.get("champion_value")
        rows.append((f"champion before this run ({LABELS.get(verdict.get('champion_kind') or '', '?')})",
                     verdict["champion_version"], value))
    body = "".join(f"<tr><td>{html.escape(who)}</td><td>{html.escape(str(v))}</td>"
                   f"<td>{'not comparable' if x is None else f'{x:.5f}'}</td></tr>" for who, v, x in rows)
    return (f"<table><tr><th>model</th><th>version</th><th>{html.escape(verdict['metric'])} on "
            f"{int(verdict['users']):,} users</th></tr>{body}</table>")


def check(data_dir: Path | str, sasrec_dir: Path | str, e4srec_dir: Path | str, output: Path | str,
          overwrite: bool = False) -> None:
    """Refuse, before any work, an output that is not free or that overlaps the inputs."""
    preflight(output, overwrite, {"--data": data_dir, "--sasrec": sasrec_dir, "--e4srec": e4srec_dir})


def run(data_dir: Path | str, sasrec_dir: Path | str, e4srec_dir: Path | str, output: Path | str, *,
        verdict_dir: Path | str | None = None, overwrite: bool = False, tracker: Tracker | None = None,
        title: str = "") -> dict[str, float]:
    """Write report.html and its PNGs into `output`."""
    from e4srec import plots

    tracker = tracker or Tracker(None)
    check(data_dir, sasrec_dir, e4srec_dir, output, overwrite)
    sasrec_dir, e4srec_dir = Path(fetch(sasrec_dir)), Path(fetch(e4srec_dir))
    manifest_path = Path(fetch(data_dir)) / c.MANIFEST
    manifest = c.read_json_object(manifest_path, c.MANIFEST_FIELDS | {"input": dict, "n_interactions": int},
                                  "point --data at a prepare-data output")
    for folder, expected in ((sasrec_dir, "sasrec"), (e4srec_dir, "e4srec")):  # one run's artifacts, one item map
        kind, meta = read_config(folder)
        if kind != expected:
            raise E4SRecError(f"{folder}: a {LABELS[kind]} model where the {LABELS[expected]} model belongs; pass "
                              f"pretrain-sasrec's output as --sasrec and train-e4srec's as --e4srec")
        c.check_item_map_hash(meta.get("item_map_sha256"), manifest["item_map_sha256"], str(folder / "config.json"),
                              "report on the models and the data of one run")
    sasrec, e4srec = c.read_json(sasrec_dir / c.METRICS), c.read_json(e4srec_dir / c.METRICS)
    rows = {"SASRec": sasrec, "E4SRec": e4srec} | published.for_dataset(manifest["input"]["name"])
    verdict = {}
    if verdict_dir:
        verdict = c.read_json(Path(fetch(verdict_dir)) / "verdict.json")  # named, so it must be there
    sections = []
    with staged_output(output, overwrite) as out:
        dataset = html.escape(manifest["input"]["name"])
        sections.append(f"<h1>{html.escape(title or 'E4SRec run report')}</h1><p class=muted>{dataset}: "
                        f"{manifest['n_users']:,} users, {manifest['n_items']:,} items, "
                        f"{manifest['n_interactions']:,} interactions; leave-one-out, histories cut to "
                        f"{manifest['max_len']}; {time.strftime('%Y-%m-%d %H:%M')}</p>")
        note = ""
        if e4srec.get("eval/users", manifest["n_users"]) < manifest["n_users"]:
            note = (f"<p class=muted>E4SRec was evaluated on {int(e4srec['eval/users']):,} of "
                    f"{manifest['n_users']:,} users (seeded sample) and trained on "
                    f"{int(e4srec.get('train/examples', 0)):,} examples; SASRec on all users.</p>")
        published_note = ("<p class=muted>Grey rows: published numbers for this dataset.</p>"
                          if len(rows) > 2 else "<p class=muted>No published numbers recorded for this dataset.</p>")
        sections.append(f"<h2>Metrics</h2>{note}{_table(rows)}{published_note}"
                        f"{_png(_comparison(rows), out, 'metrics_comparison.png')}")
        sasrec_log = c.read_json_list(sasrec_dir / "training_log.json", "re-run pretrain-sasrec")
        e4srec_log = c.read_json_list(e4srec_dir / "training_log.json", "re-run train-e4srec")
        curves = _png(plots.training_curves(sasrec_log), out, "sasrec_training.png")
        if e4srec_log:
            curves += _png(plots.step_curves(e4srec_log), out, "e4srec_training.png")
        sections.append(f"<h2>Training</h2><p>SASRec (per epoch) and E4SRec (per optimizer step).</p>{curves}")
        groups = {"SASRec": c.read_json(sasrec_dir / "metrics_by_length.json")["test"],
                  "E4SRec": c.read_json(e4srec_dir / "metrics_by_length.json")["test"]}
        sections.append(f"<h2>By history length</h2><p>Test NDCG@10 by the number of items before the target "
                        f"(the E4SRec paper's Fig. 4); user counts under the groups.</p>"
                        f"{_png(_by_length(groups), out, 'metrics_by_length.png')}")
        if verdict.get("registered_model"):
            from e4srec import registry

            cls = "promote" if verdict["promote"] else "hold"
            try:
                history = registry.alias_history(verdict["registered_model"])
                moves = "".join(f"<tr><td>{html.escape(registry.describe(m))}</td></tr>" for m in history)
            except Exception as e:  # noqa: BLE001 (the report must not fail on a registry hiccup)
                moves = f"<tr><td>alias history unavailable: {html.escape(str(e))}</td></tr>"
            sections.append(
                f"<h2>Deploy</h2><p class='verdict {cls}'><b>{cls}</b>: {html.escape(verdict['reason'])}</p>"
                f"{_gate_table(verdict)}"
                f"<p>{html.escape(verdict['registered_model'])} version {verdict['challenger_version']} "
                f"(alias challenger). Serve the champion: "
                f"<code>{html.escape(registry.serve_command(verdict['registered_model']))}</code></p>"
                f"<table><tr><th>alias moves so far</th></tr>{moves}</table>")
        (out / PAGE).write_text(f"<!doctype html><html><head><meta charset=utf-8><title>E4SRec report</title>"
                                f"<style>{CSS}</style></head><body>{''.join(sections)}</body></html>\n")
        tracker.log_artifacts(out, "report")
    return {"report/models": float(len(rows))}


run_tracked = tracked(STAGE, check)(run)
