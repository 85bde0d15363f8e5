"""The paper's tables and figures from tidy measurement rows.

Rows: `dataset, method, model, attack, modality, eps, accuracy, n` (see mmrobust/evaluation.py). Each table is
written as `<id>.csv` (the tidy rows it uses) and `<id>.md` (the paper-style pivot); figures as `<id>.png`.
A table is written whenever at least one of the models it compares exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mmrobust.io import atomic_file, save_png, write_csv

ROW_FIELDS = ["dataset", "method", "model", "attack", "modality", "eps", "accuracy", "n"]
ATTACK_NAMES = {"clean": "Clean", "fgm": "FGM", "pgd": "PGD", "missing": "Missing", "mgn": "MGN", "mpm": "MPM",
                "mea": "MEA"}

# Paper order of the methods in each table (model ids of the default `models` params).
T1_MODELS = ["jt", "gb", "ogm_ge", "pmr", "msefm", "mmat", "mixup", "crmt_jt", "crmt_at", "crmt_mix"]
T10_MODELS = ["ume_mma", "rmtl", "crmt_jt"]
F5_MODELS = ["jt", "ojt", "crmt_step1", "crmt_step2", "crmt_jt"]
CURVE_MODELS = ["jt", "mmat", "crmt_jt", "crmt_at"]


@dataclass
class Column:
    title: str
    match: Callable[[dict], bool]


def _col(attack: str, modality: str = "all", eps: float | None = None, title: str | None = None) -> Column:
    def match(r: dict) -> bool:
        return (r["attack"] == attack and r["modality"] == modality
                and (eps is None or abs(float(r["eps"]) - eps) < 1e-9))
    name = title or (ATTACK_NAMES.get(attack, attack) + (f" #{modality[0]}" if modality != "all" else "")
                     + (f" {eps:g}" if eps is not None and attack not in ("clean", "missing") else ""))
    return Column(name, match)


def pivot(rows: list[dict], models: list[str], columns: list[Column]) -> tuple[list[str], list[list[str]], list[dict]]:
    """Markdown header, body and the tidy rows used, for `models` (in order, where present) × `columns`."""
    present = [m for m in models if any(r["model"] == m for r in rows)]
    used, body = [], []
    for model in present:
        mine = [r for r in rows if r["model"] == model]
        cells = []
        for col in columns:
            hits = [r for r in mine if col.match(r)]
            cells.append(f"{float(hits[0]['accuracy']):.3f}" if hits else "–")
            used += hits[:1]
        body.append([model, *cells])
    return ["model", *(c.title for c in columns)], body, used


def markdown(title: str, header: list[str], body: list[list[str]], note: str = "") -> str:
    lines = [f"## {title}", ""]
    if note:
        lines += [note, ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _write_table(out: Path, table_id: str, title: str, header, body, used, note: str = "") -> Path | None:
    if not body:
        return None
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / f"{table_id}.csv", used, ROW_FIELDS)
    with atomic_file(out / f"{table_id}.md") as fh:
        fh.write(markdown(f"{table_id}: {title}", header, body, note))
    return out / f"{table_id}.md"


def modalities_of(rows: list[dict]) -> list[str]:
    return sorted({r["modality"] for r in rows if r["modality"] != "all"})


def write_tables(rows: list[dict], out: Path, joint_eps: float, uni_eps: float, models: dict[str, str]) -> list[Path]:
    """All tables that the available models allow. `models` maps model id -> method."""
    mods = modalities_of(rows)
    written = []
    t1 = [_col("clean"), _col("fgm", eps=joint_eps), _col("pgd", eps=joint_eps)]
    written.append(_write_table(out, "T1", f"clean / FGM / l2-PGD accuracy (joint, eps {joint_eps:g})",
                                *pivot(rows, T1_MODELS + _others(models, T1_MODELS), t1)))
    t2 = [_col("clean")] + [_col(a, m, uni_eps) for a in ("fgm", "pgd") for m in mods] + [
        _col("missing", m, 0.0, f"Missing #{m[0]}") for m in mods]
    written.append(_write_table(out, "T2", f"uni-modal attacks (eps {uni_eps:g}) and missing modalities",
                                *pivot(rows, T1_MODELS + _others(models, T1_MODELS), t2)))
    noise = sorted({(r["attack"], float(r["eps"])) for r in rows if r["attack"] in ("mgn", "mpm", "mea")})
    t7 = [_col("clean")] + [_col(a, eps=e) for a, e in noise]
    written.append(_write_table(out, "T7", "multimodal Gaussian noise (MGN, sigma), pixel masking (MPM, p) and "
                                "embedding attack (MEA, eps)", *pivot(rows, T1_MODELS + _others(models, T1_MODELS), t7)))
    t10 = t1 + [_col("missing", m, 0.0, f"Missing #{m[0]}") for m in mods]
    written.append(_write_table(out, "T10", "uni-modal ensemble / multi-task baselines vs CRMT-JT",
                                *pivot(rows, T10_MODELS, t10)))
    iters = [m for m, method in models.items() if method == "crmt_jt"]
    grid = sorted({float(r["eps"]) for r in rows if r["attack"] == "fgm" and r["modality"] == "all"})
    t11 = [_col("clean", title="0")] + [_col("fgm", eps=e, title=f"{e:g}") for e in grid]
    written.append(_write_table(out, "T11", "CRMT iterations vs joint FGM attack size", *pivot(rows, iters, t11),
                                note="Columns: joint FGM radius (0 = clean)."))
    return [p for p in written if p is not None]


def _others(models: dict[str, str], listed: list[str]) -> list[str]:
    return [m for m in models if m not in listed]


def curve(rows: list[dict], model: str, attack: str, modality: str) -> list[tuple[float, float]]:
    pts = [(0.0, float(r["accuracy"])) for r in rows if r["model"] == model and r["attack"] == "clean"]
    pts += [(float(r["eps"]), float(r["accuracy"])) for r in rows
            if r["model"] == model and r["attack"] == attack and r["modality"] == modality]
    return sorted(pts)


def write_figures(rows: list[dict], out: Path, models: dict[str, str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    mods = modalities_of(rows)
    # models measured on the uni-modal radius grid (more than one radius), paper's order first
    def on_grid(m: str) -> bool:
        return len({r["eps"] for r in rows if r["model"] == m and r["attack"] == "pgd" and r["modality"] != "all"}) > 1
    curve_models = [m for m in CURVE_MODELS + _others(models, CURVE_MODELS) if m in models and on_grid(m)]
    if curve_models and mods:
        fig, axes = plt.subplots(1, len(curve_models), figsize=(4 * len(curve_models), 3.2), squeeze=False)
        for ax, model in zip(axes[0], curve_models):
            for m in mods:
                xs, ys = zip(*curve(rows, model, "pgd", m))
                ax.plot(xs, ys, marker="o", label=f"attack #{m}")
            ax.set_title(model)
            ax.set_xlabel("uni-modal l2-PGD radius")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("accuracy")
        axes[0][-1].legend()
        fig.tight_layout()
        written.append(_save(fig, out / "F1_F4.png"))
    ablation = [m for m in F5_MODELS if any(r["model"] == m for r in rows)]
    if ablation:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for model in ablation:
            xs, ys = zip(*curve(rows, model, "pgd", "all"))
            ax.plot(xs, ys, marker="o", label=model)
        ax.set_xlabel("joint l2-PGD radius")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title("F5: ablation")
        fig.tight_layout()
        written.append(_save(fig, out / "F5.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    save_png(fig, path, dpi=110)
    plt.close(fig)
    return path


def write_index(out: Path, tables_written: list[Path], figures: list[Path]) -> Path:
    """results/README.md: every table inline and every figure linked, in one place."""
    lines = ["# Results", "", "Tidy measurements: `measurements.csv`; headline numbers: `metrics.json`.", ""]
    for t in sorted(tables_written, key=lambda p: (len(p.stem), p.stem)):
        lines += [t.read_text(), f"([csv](tables/{t.stem}.csv))", ""]
    for f in figures:
        lines += [f"## {f.stem}", "", f"![{f.stem}](figures/{f.name})", ""]
    with atomic_file(out / "README.md") as fh:
        fh.write("\n".join(lines))
    return out / "README.md"
