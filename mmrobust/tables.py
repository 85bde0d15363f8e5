"""The paper's tables and figures from tidy measurement rows.

Rows: `dataset, method, model, attack, modality, eps, accuracy, n` (see mmrobust/evaluation/measure.py). Each table is
written as `<id>.csv` (the tidy rows it uses) and `<id>.md` (the paper-style pivot); figures as `<id>.png`.
A table is written whenever at least one of the models it compares exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mmrobust.attacks.specs import SPECS, WORST, of_kind, parse_strength, strength_title, titles
from mmrobust.io import atomic_file, save_png, write_csv

ROW_FIELDS = ["dataset", "method", "model", "attack", "modality", "eps", "accuracy", "n"]
ATTACK_NAMES = titles()

# Paper order of the methods in each table (model ids of the default `models` params).
T1_MODELS = ["jt", "gb", "ogm_ge", "pmr", "msefm", "mmat", "mixup", "crmt_jt", "crmt_at", "crmt_mix"]
T10_MODELS = ["ume_mma", "rmtl", "crmt_jt"]
F5_MODELS = ["jt", "ojt", "crmt_step1", "crmt_step2", "crmt_jt"]
CURVE_MODELS = ["jt", "mmat", "crmt_jt", "crmt_at"]


@dataclass(frozen=True)
class Arch:
    """What a model is built from, which decides the tables it belongs to (T1/T2/T7: the base architecture;
    T3 MMT, T4 other backbones, T5 MMTM, T6 pretrained encoders, T8 three or more modalities)."""
    fusion: str = "late"
    encoders: tuple[tuple[str, str], ...] = ()  # (modality, encoder name)
    pretrained: tuple[str, ...] = ()            # modalities with loaded weights

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m, _ in self.encoders)

    def describe(self) -> str:
        names = {e for _, e in self.encoders}
        enc = (next(iter(names)) + " " + "+".join(m[0].upper() for m in self.modalities) if len(names) == 1
               else " + ".join(f"{e} {m[0].upper()}" for m, e in self.encoders))
        parts = [enc] + ([self.fusion.upper()] if self.fusion != "late" else [])
        parts += [f"pretrained {'+'.join(m[0].upper() for m in self.pretrained)}"] if self.pretrained else ["scratch"]
        return ", ".join(parts)


def arch_of(params, modalities: list[str] | None = None) -> Arch:
    """The Arch of a trained model from its params (mmrobust.config.Params) and modalities."""
    cfg = params.train.model
    mods = modalities or params.modalities
    enc = cfg.encoder if isinstance(cfg.encoder, dict) else {m: cfg.encoder for m in mods}
    return Arch(cfg.fusion, tuple((m, enc.get(m, "?")) for m in mods), tuple(sorted(cfg.pretrained)))


def base_arch(archs: dict[str, Arch]) -> Arch | None:
    """The most common late-fusion, from-scratch architecture with a single encoder type (the T1 setting)."""
    plain = [a for a in archs.values() if a.fusion == "late" and not a.pretrained
             and len({e for _, e in a.encoders}) == 1]
    return max(set(plain), key=lambda a: (plain.count(a), a.encoders)) if plain else None


@dataclass
class Column:
    title: str
    match: Callable[[dict], bool]


def _col(attack: str, modality: str = "all", eps: float | None = None, title: str | None = None) -> Column:
    def match(r: dict) -> bool:
        return (r["attack"] == attack and r["modality"] == modality
                and (eps is None or abs(float(r["eps"]) - eps) < 1e-9))
    name = title or (ATTACK_NAMES.get(attack, attack) + (f" #{modality[0]}" if modality != "all" else "")
                     + (f" {eps:g}" if eps is not None and attack != "clean" and attack not in of_kind(SPECS, "missing")
                        else ""))
    return Column(name, match)


def pivot(rows: list[dict], models: list[str], columns: list[Column], labels: dict[str, str] | None = None
          ) -> tuple[list[str], list[list[str]], list[dict]]:
    """Markdown header, body and the tidy rows used, for `models` (in order, where present) × `columns`;
    `labels` adds an architecture column."""
    present = [m for m in models if any(r["model"] == m for r in rows)]
    used, body = [], []
    for model in present:
        mine = [r for r in rows if r["model"] == model]
        cells = []
        for col in columns:
            hits = [r for r in mine if col.match(r)]
            cells.append(f"{float(hits[0]['accuracy']):.3f}" if hits else "–")
            used += hits[:1]
        body.append([model, *([labels.get(model, "")] if labels else []), *cells])
    return ["model", *(["architecture"] if labels else []), *(c.title for c in columns)], body, used


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


def write_tables(rows: list[dict], out: Path, joint_eps: float, uni_eps: float, models: dict[str, str],
                 archs: dict[str, Arch] | None = None, attacks: list[str] | None = None, pgd_steps: int = 4
                 ) -> list[Path]:
    """All tables that the available models allow. `models` maps model id -> method, `archs` model id -> Arch
    (without it every model counts as the base architecture); `attacks` the evaluated attacks in column order
    (default: every declared one that was measured), their kind deciding the tables they are columns of."""
    measured = {r["attack"] for r in rows}
    attacks = [a for a in SPECS if a in measured] if attacks is None else attacks
    robust, corruptions = of_kind(attacks, "robust"), of_kind(attacks, "corruption")
    if WORST in measured and len(robust) > 1:  # the per-sample worst case, beside the attacks it summarises
        robust.append(WORST)
    mods = modalities_of(rows)
    archs = archs or {}
    in_base = in_base_arch(models, archs)
    main = [m for m in T1_MODELS if m in in_base] + _others({m: models[m] for m in in_base}, T1_MODELS)
    written = []
    t1 = [_col("clean")] + [_col(a, eps=joint_eps) for a in robust]
    written.append(_write_table(out, "T1", f"clean / {' / '.join(ATTACK_NAMES[a] for a in robust)} accuracy "
                                f"(joint l2, eps {joint_eps:g})", *pivot(rows, main, t1)))
    per_modality = {r["attack"] for r in rows if r["modality"] != "all"}  # APGD, e.g., is joint only
    uni = [_col(a, m, uni_eps) for a in robust if a in per_modality for m in mods]
    missing = [_col(a, m, 0.0, f"{ATTACK_NAMES[a]} #{m[0]}") for a in of_kind(attacks, "missing") for m in mods]
    written.append(_write_table(out, "T2", f"uni-modal attacks (eps {uni_eps:g}) and missing modalities",
                                *_without_empty_columns(*pivot(rows, main, [_col("clean")] + uni + missing), fixed=1)))
    noise = sorted({(r["attack"], float(r["eps"])) for r in rows if r["attack"] in corruptions})
    t7 = [_col("clean")] + [_col(a, eps=e) for a, e in noise]
    written.append(_write_table(out, "T7", "multimodal Gaussian noise (MGN, sigma), pixel masking (MPM, p) and "
                                "embedding attack (MEA, eps)", *pivot(rows, main, t7)))
    written += _architecture_tables(rows, out, models, archs, t1, uni, missing, uni_eps)
    t10 = t1 + missing
    written.append(_write_table(out, "T10", "uni-modal ensemble / multi-task baselines vs CRMT-JT",
                                *_without_empty_columns(*pivot(rows, [m for m in T10_MODELS if m in in_base], t10),
                                                        fixed=1)))
    iters = t11_models(models, in_base)
    grid = sorted({float(r["eps"]) for r in rows if r["attack"] == "fgm" and r["modality"] == "all"})
    t11 = [_col("clean", title="0")] + [_col("fgm", eps=e, title=f"{e:g}") for e in grid]
    written.append(_write_table(out, "T11", "CRMT iterations vs joint FGM attack size", *pivot(rows, iters, t11),
                                note="Columns: joint FGM radius (0 = clean)."))
    written += _certified_tables(rows, out, models, mods)
    written.append(_strength_table(rows, out, list(models), joint_eps, pgd_steps))
    return [p for p in written if p is not None]


MASKING_STEP_DROP = 0.02   # accuracy still falling by this much between the two largest PGD step counts
MASKING_APGD_GAP = 0.05    # APGD this far below the main PGD (the 5 points)


def _strength_runs(rows: list[dict], joint_eps: float) -> dict[str, dict[str, float]]:
    """{model: {attack: accuracy}} of the joint measurements at joint_eps (clean included)."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["modality"] == "all" and (r["attack"] == "clean" or abs(float(r["eps"]) - joint_eps) < 1e-9):
            out.setdefault(r["model"], {})[r["attack"]] = float(r["accuracy"])
    return out


def strength_flags(rows: list[dict], joint_eps: float, pgd_steps: int = 4) -> dict[str, list[str]]:
    """{model: reasons} for the models whose robust accuracy looks gradient-masked: still falling by
    MASKING_STEP_DROP or more between the two largest PGD iteration counts, or APGD at least MASKING_APGD_GAP
    below the main PGD (`pgd_steps` iterations)."""
    flags: dict[str, list[str]] = {}
    for model, acc in _strength_runs(rows, joint_eps).items():
        steps = {pgd_steps: acc["pgd"]} if "pgd" in acc else {}
        for a, v in acc.items():  # single-run strength measurements (restarts are not on the step curve)
            parsed = parse_strength(a)
            if parsed and parsed[1] == 1:
                steps[parsed[0]] = v
        curve = sorted(steps.items())
        reasons = []
        if len(curve) >= 2 and curve[-2][1] - curve[-1][1] >= MASKING_STEP_DROP - 1e-9:
            reasons.append(f"PGD-{curve[-1][0]} {100 * (curve[-2][1] - curve[-1][1]):.1f} points below "
                           f"PGD-{curve[-2][0]}: still falling with more steps")
        for a in ("apgd_ce", "apgd_dlr"):
            if a in acc and "pgd" in acc and acc["pgd"] - acc[a] >= MASKING_APGD_GAP - 1e-9:
                reasons.append(f"{ATTACK_NAMES[a]} {100 * (acc['pgd'] - acc[a]):.1f} points below PGD-{pgd_steps}")
        if reasons:
            flags[model] = reasons
    return flags


def _strength_table(rows: list[dict], out: Path, models: list[str], joint_eps: float, pgd_steps: int = 4
                    ) -> Path | None:
    """S: the attack-strength report, joint l2 at joint_eps: the main PGD, PGD with more iterations and restarts,
    APGD and the per-sample worst case, with a gradient-masking flag per model."""
    extra = sorted({r["attack"] for r in rows if parse_strength(r["attack"])},
                   key=lambda a: (parse_strength(a)[1] > 1, parse_strength(a)[0]))
    if not extra:
        return None
    flags = strength_flags(rows, joint_eps, pgd_steps)
    # the strength models, and every other model whose APGD alone flags it (APGD runs for all models)
    chosen = [m for m in models if m in flags or any(r["model"] == m and r["attack"] in extra for r in rows)]
    present = {r["attack"] for r in rows}
    cols = [_col("clean"), _col("pgd", eps=joint_eps, title=f"PGD-{pgd_steps}")]
    cols += [_col(a, eps=joint_eps, title=strength_title(a)) for a in extra]
    cols += [_col(a, eps=joint_eps, title=ATTACK_NAMES[a]) for a in ("apgd_ce", "apgd_dlr", WORST) if a in present]
    header, body, used = pivot(rows, chosen, cols)
    body = [row + ["; ".join(flags.get(row[0], [])) or "–"] for row in body]
    flagged = ", ".join(m for m in chosen if m in flags) or "none"
    return _write_table(out, "S", f"attack strength (joint l2, eps {joint_eps:g}) and gradient-masking flags",
                        header + ["possibly gradient-masked"], body, used,
                        note=f"Possibly gradient-masked: {flagged}. A model is flagged when its accuracy still "
                             f"falls by {100 * MASKING_STEP_DROP:g}+ points between the two largest PGD iteration "
                             f"counts, or when APGD is {100 * MASKING_APGD_GAP:g}+ points below PGD-{pgd_steps}. "
                             "Restarts use random starts; Worst is the per-sample minimum over every attack.")


def _certified_tables(rows, out, models, mods) -> list[Path | None]:
    """CA: certified accuracy CA(r) of the sound (Lipschitz) certificate and of randomised smoothing (noise on
    every modality) beside l2-PGD at the same joint radius; CAm: smoothing with noise on one modality beside
    that modality's PGD."""
    def has(model, attack, joint):
        return any(r["model"] == model and r["attack"] == attack and (r["modality"] == "all") == joint for r in rows)

    def radii(attack, joint):
        return sorted({float(r["eps"]) for r in rows if r["attack"] == attack and (r["modality"] == "all") == joint})

    measured = {a: radii(a, True) for a in ("certified", "smoothed")}
    joint_r = sorted({*measured["certified"], *measured["smoothed"]})
    ca = []
    for e in joint_r:
        ca += [_col(a, eps=e, title=f"{t} {e:g}") for a, t in (("certified", "CA"), ("smoothed", "RS"))
               if e in measured[a]]
        ca.append(_col("clean", title="clean") if e == 0 else _col("pgd", eps=e, title=f"PGD {e:g}"))
    chosen = [m for m in models if has(m, "certified", True) or has(m, "smoothed", True)]
    written = [_write_table(out, "CA", "certified accuracy CA(r): sound certificate (CA) and randomised smoothing (RS) "
                            "beside l2-PGD accuracy at the same joint radius", *pivot(rows, chosen, ca),
                            note="CA(r): share of test samples whose certified l2 radius (encoder Lipschitz upper "
                                 "bounds) exceeds r; it can never exceed the accuracy under any attack of size r. "
                                 "RS(r): the smoothed classifier (Gaussian noise on every modality) is right and "
                                 "certifies radius >= r (Cohen et al. 2019; abstentions wrong); it certifies the "
                                 "smoothed classifier, while PGD attacks the plain one.")]
    uni_r = radii("smoothed", False)
    cam = [c for m in mods for e in uni_r
           for c in (_col("smoothed", m, e, f"RS #{m[0]} {e:g}"),
                     *([_col("pgd", m, e, f"PGD #{m[0]} {e:g}")] if e > 0 else []))]
    written.append(_write_table(out, "CAm", "randomised smoothing with noise on one modality (the others clean) "
                                "beside that modality's l2-PGD at the same radius",
                                *pivot(rows, [m for m in models if has(m, "smoothed", False)], cam)))
    return written


ARCH_TABLES = {"T3": lambda a, base: a.fusion == "mmt",
               "T4": lambda a, base: (a.fusion == "late" and not a.pretrained and base is not None
                                      and a.encoders != base.encoders and a.modalities == base.modalities),
               "T5": lambda a, base: a.fusion == "mmtm",
               "T6": lambda a, base: bool(a.pretrained),
               "T8": lambda a, base: len(a.modalities) >= 3}


def architecture_groups(models: dict[str, str], archs: dict[str, Arch]) -> dict[str, list[str]]:
    """{T3/T4/T5/T6/T8: the models whose architecture puts them there}, JT-style before CRMT within a table."""
    base = base_arch(archs)

    def pick(test) -> list[str]:
        chosen = [m for m in models if m in archs and test(archs[m], base)]
        return sorted(chosen, key=lambda m: (archs[m].describe(), models[m].startswith("crmt"), m))
    return {tid: pick(test) for tid, test in ARCH_TABLES.items()}


def _architecture_tables(rows, out, models, archs, t1, uni, missing, uni_eps) -> list[Path | None]:
    """T3 (MMT), T4 (other backbones), T5 (MMTM), T6 (pretrained), T8 (three or more modalities)."""
    labels = {m: a.describe() for m, a in archs.items()}
    groups = architecture_groups(models, archs)
    t3 = [*t1, *uni]
    specs = [("T3", "MMT (intermediate-fusion transformer) vs CRMT-MMT, joint and uni-modal attacks "
              f"(uni-modal eps {uni_eps:g})", groups["T3"], t3),
             ("T4", "backbones: JT vs CRMT-JT with other encoders", groups["T4"], [t1[0], *missing, *t1[1:]]),
             ("T5", "MMTM (intermediate fusion) vs CRMT-MMTM", groups["T5"], t3),
             ("T6", "pretrained encoders: baseline vs CRMT", groups["T6"], t3),
             ("T8", "three or more modalities (e.g. UCF101 RGB + flow + frame difference), from scratch and "
              "pretrained", groups["T8"], [*t1, *[c for c in uni if c.title.startswith("PGD")], *missing])]
    return [_write_table(out, tid, title, *_without_empty_columns(*pivot(rows, chosen, cols, labels), fixed=2))
            for tid, title, chosen, cols in specs]


def _without_empty_columns(header, body, used, fixed: int):
    """Drop the measurement columns no model of the table has (e.g. the flow column where no model sees flow)."""
    keep = [i for i in range(len(header)) if i < fixed or any(row[i] != "–" for row in body)]
    return [header[i] for i in keep], [[row[i] for i in keep] for row in body], used


def _others(models: dict[str, str], listed: list[str]) -> list[str]:
    return [m for m in models if m not in listed]


def curve(rows: list[dict], model: str, attack: str, modality: str) -> list[tuple[float, float]]:
    pts = [(0.0, float(r["accuracy"])) for r in rows if r["model"] == model and r["attack"] == "clean"]
    pts += [(float(r["eps"]), float(r["accuracy"])) for r in rows
            if r["model"] == model and r["attack"] == attack and r["modality"] == modality]
    return sorted(pts)


def t11_models(models: dict[str, str], in_base: list[str]) -> list[str]:
    """T11's models: the CRMT-JT variants (iterations) of the base architecture."""
    return [m for m, method in models.items() if method == "crmt_jt" and m in in_base]


def in_base_arch(models: dict[str, str], archs: dict[str, Arch] | None) -> list[str]:
    """The models of the base architecture (all of them when no architectures are known)."""
    archs = archs or {}
    base = base_arch(archs)
    return [m for m in models if m not in archs or archs[m] == base]


def curve_series(rows: list[dict], models: dict[str, str], archs: dict[str, Arch] | None = None
                 ) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """The accuracy-vs-radius curves of the figures, {figure: {series: [(radius, accuracy)]}} (radius 0 = clean):
    F1_F4 uni-modal PGD per attacked modality of the models measured on the uni-modal grid, F5 joint PGD of the
    ablation, T11 joint FGM of the CRMT-JT iteration variants."""
    def on_grid(m: str) -> bool:  # measured at more than one uni-modal radius
        return len({r["eps"] for r in rows if r["model"] == m and r["attack"] == "pgd" and r["modality"] != "all"}) > 1
    mods = modalities_of(rows)
    measured = {r["model"] for r in rows}
    uni = [m for m in CURVE_MODELS + _others(models, CURVE_MODELS) if m in models and on_grid(m)]
    out = {"F1_F4": {f"{model} #{m}": curve(rows, model, "pgd", m) for model in uni for m in mods},
           "F5": {model: curve(rows, model, "pgd", "all") for model in F5_MODELS if model in measured},
           "T11": {model: curve(rows, model, "fgm", "all") for model in t11_models(models, in_base_arch(models, archs))
                   if model in measured}}
    return {fig: {k: pts for k, pts in series.items() if len(pts) > 1} for fig, series in out.items()}


def write_curves(rows: list[dict], out: Path, models: dict[str, str], archs: dict[str, Arch] | None = None
                 ) -> list[Path]:
    """`curve_series` as long CSVs (series, radius, accuracy): what `dvc plots show` draws (dvc.yaml, template
    .dvc/plots/curves.json: one line per series)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fig, series in curve_series(rows, models, archs).items():
        if series:
            data = [{"series": k, "radius": x, "accuracy": y} for k, pts in series.items() for x, y in pts]
            write_csv(out / f"{fig}.csv", data, ["series", "radius", "accuracy"])
            written.append(out / f"{fig}.csv")
    return written


def write_figures(rows: list[dict], out: Path, models: dict[str, str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    curves = curve_series(rows, models)
    mods = modalities_of(rows)
    uni_models = list(dict.fromkeys(k.split(" #")[0] for k in curves["F1_F4"]))
    if uni_models:
        fig, axes = plt.subplots(1, len(uni_models), figsize=(4 * len(uni_models), 3.2), squeeze=False)
        for ax, model in zip(axes[0], uni_models):
            for m in mods:
                if f"{model} #{m}" in curves["F1_F4"]:
                    xs, ys = zip(*curves["F1_F4"][f"{model} #{m}"])
                    ax.plot(xs, ys, marker="o", label=f"attack #{m}")
            ax.set_title(model)
            ax.set_xlabel("uni-modal l2-PGD radius")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("accuracy")
        axes[0][-1].legend()
        fig.tight_layout()
        written.append(_save(fig, out / "F1_F4.png"))
    if curves["F5"]:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for model, pts in curves["F5"].items():
            xs, ys = zip(*pts)
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


def write_across_datasets(per_dataset: dict[str, Path], out: Path, joint_eps: float, models: dict[str, str]
                          ) -> Path:
    """The paper's T1 layout: one row per model, a clean / FGM / l2-PGD column group per dataset, from each
    dataset's own T1 rows (`<dataset dir>/tables/T1.csv`, base architecture only). Writes `<out>/tables/T1.*`
    and `<out>/README.md`, which links every dataset's tables and figures."""
    from mmrobust.io import atomic_dir, read_csv

    rows = []
    for name, folder in per_dataset.items():
        t1 = folder / "tables" / "T1.csv"
        if not t1.exists():
            raise FileNotFoundError(f"{t1}: no T1 of dataset {name!r} (run its evaluation: dvc repro evaluate@{name})")
        rows += [dict(r, dataset=name) for r in read_csv(t1)]

    def of(dataset: str, col: Column) -> Column:
        return Column(f"{dataset} {col.title}", lambda r: r["dataset"] == dataset and col.match(r))

    measured = {r["attack"] for r in rows}
    robust = [a for a in [*of_kind(SPECS, "robust"), WORST] if a in measured]  # the datasets' own T1 columns
    per = [_col("clean")] + [_col(a, eps=joint_eps) for a in robust]
    cols = [of(d, c) for d in per_dataset for c in per]
    order = [m for m in T1_MODELS if m in models] + _others(models, T1_MODELS)
    with atomic_dir(out / "tables") as tmp:
        table = _write_table(tmp, "T1", f"clean / {' / '.join(ATTACK_NAMES[a] for a in robust)} accuracy (joint "
                             f"l2, eps {joint_eps:g}) on {', '.join(per_dataset)}", *pivot(rows, order, cols),
                             note="One column group per dataset; each dataset's base architecture (see its T1).")
        text = table.read_text() if table else "No model was evaluated.\n"
    lines = ["# Results", "", text, "([csv](tables/T1.csv))" if table else "", "", "## Per dataset", ""]
    for name, folder in per_dataset.items():
        rel = folder.relative_to(out).as_posix() if folder.is_relative_to(out) else folder.as_posix()
        tables_ = sorted((folder / "tables").glob("*.md"), key=lambda p: (len(p.stem), p.stem))
        figures = sorted((folder / "figures").glob("*.png"))
        lines.append(f"- **{name}** ([all tables and figures]({rel}/README.md)): tables "
                     + ", ".join(f"[{p.stem}]({rel}/tables/{p.name})" for p in tables_)
                     + ("; figures " + ", ".join(f"[{p.stem}]({rel}/figures/{p.name})" for p in figures)
                        if figures else ""))
    with atomic_file(out / "README.md") as fh:
        fh.write("\n".join(lines) + "\n")
    return out / "README.md"
