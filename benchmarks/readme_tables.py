"""Rewrite the README's benchmark tables from benchmarks/results/*.json.

    python benchmarks/readme_tables.py          # rewrite README.md in place
    python benchmarks/readme_tables.py --check  # exit 1 if README.md is not what the files say

Each table sits between `<!-- generated: NAME -->` and `<!-- /generated: NAME -->` in
README.md; everything between the two markers is replaced, everything else is kept. Every
row names the results file it comes from; each file holds the command that made it.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RECIPE = RESULTS / "recipe"

# The recipe ablation: (the run, results/recipe/<run>-seed42.json; which of its weights, "raw"
# or its weight "average" (a run with an average also tests its raw weights: the same run without
# it); the variant of results/recipe/cost-ablation.json that prices its step; the row it changes,
# by number (1: the starting recipe); what it changes)
BASELINE = (
    "1. the starting recipe: 99 px, width 0.25, 30 epochs, one-cycle SGD (lr 0.05), batch 128, dropout 0.5"
)
ABLATION = [
    ("do25", "raw", "do25", 1, "dropout 0.25"),
    ("re_ema", "raw", "re", 2, "random erasing (p = 0.5)"),
    ("re_ema", "average", "re_ema", 3, "weight average (EMA, 0.999 per step)"),
    ("ls_ema", "raw", "do25", 2, "label smoothing 0.1"),
    ("ls_ema", "average", "ls_ema", 5, "weight average (EMA, 0.999 per step)"),
    ("do0_ls", "raw", "baseline", 5, "no dropout"),
    # wider at about the same cost: the step of width 0.3125 at 91 px costs about what width 0.25
    # at 99 px does; at 99 px it costs ×1.3-1.4, so 21 epochs take about the 30 epochs' time
    ("w3125_91", "raw", "w3125_91", 5, "width 0.3125 at 91 px"),
    ("w3125_e21", "raw", "w3125", 5, "width 0.3125, 21 epochs"),
    # the optimiser's weight decay, not the step's arithmetic: the step of row 5 (do25's)
    ("wd1e4_ls", "raw", "do25", 5, "weight decay 0.0001 (the paper's 0.0005)"),
    ("lr1_ls", "raw", "do25", 5, "peak learning rate 0.1 (twice 0.05)"),
    # rows 7 and 10 together, the two within a seed's spread above row 5: the step of row 7's
    ("do0_wd1e4_ls", "raw", "baseline", 7, "weight decay 0.0001"),
    ("b64_e28_ls", "raw", "b64", 5, "batch 64 (lr 0.025, the linear scaling rule), 28 epochs"),
    # the random crops' range: crops of 99 px from a resize to 99 × resize_ratio (row 1: 113 px)
    ("rr107_ls", "raw", "rr107", 5, "crops from 106 px, not 113 (resize ratio 1.07, not 256/224)"),
    ("rr104_ls", "raw", "rr104", 5, "crops from 103 px (resize ratio 1.04)"),
    ("rr100_ls", "raw", "rr100", 5, "no random crops: the whole image at 99 px (resize ratio 1.0)"),
    # dropout's cost is within the cost measurement's noise (rows 5 and 7): row 14's step prices both
    ("rr107_do0_ls", "raw", "rr107", 14, "no dropout"),
    ("rr107_val0_ls", "raw", "rr107", 14, "no validation hold-out: all 60,000 training images train"),
    # on the committed recipe (row 18): label smoothing costs no arithmetic, erasing's is within the
    # cost measurement's noise (row 3, at p = 0.5: ×1.00), so row 14's step prices both
    ("rr107_val0_ls20", "raw", "rr107", 18, "label smoothing 0.2, not 0.1"),
    ("rr107_val0_ls_re15", "raw", "rr107", 18, "random erasing (p = 0.15)"),
    # the lighting is a per-image colour shift (a few ops on a (N, C) tensor), dropout's rate costs
    # nothing: row 14's step prices both
    ("rr107_val0_ls_l0", "raw", "rr107", 18, "no PCA lighting (lighting_std 0, not 0.1)"),
    ("rr107_val0_ls_do10", "raw", "rr107", 18, "dropout 0.1, not 0.25"),
    ("rr107_val0_ls_b256", "raw", "b256", 18, "batch 256 (lr 0.1, the linear scaling rule)"),
    ("rr107_val0_ls_e28", "raw", "rr107", 18, "28 epochs, not 30"),
    # the optimiser's settings, not the step's arithmetic: row 14's step prices both
    ("rr107_val0_ls_wd1e3", "raw", "rr107", 18, "weight decay 0.001, not 0.0005"),
    ("rr107_val0_ls_m95", "raw", "rr107", 18, "momentum 0.95, not 0.9"),
]
# Fashion-MNIST's training images: what train.val_size holds out of them is not trained on
TRAIN_IMAGES = 60_000


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def rel(path: Path) -> str:
    return f"`{path.relative_to(ROOT)}`"


def share(x: float) -> str:
    """A data share: 1 − (steps on one fixed batch) / (whole steps); below 0 when noise outweighs it."""
    return f"{100 * x:.1f}%" if x >= 0 else f"≈ 0 ({100 * x:.1f}%: the steps' noise)"


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# A variant measured in a later cost run, priced against that run's copy of an earlier variant, so
# that its row and the row it changes differ by the two steps' ratio in one run: variant → (the
# copy in its run, the variant as first measured)
PRICED_AGAINST = {"b256": ("rr107_b128", "rr107")}


def step_speed(speeds: dict, variant: str) -> float:
    """A variant's training step speed against the first row's (cost runs' speed_vs_baseline)."""
    if variant not in PRICED_AGAINST:
        return speeds[variant]["speed_vs_baseline"]
    copy, first = PRICED_AGAINST[variant]
    ratio = speeds[variant]["speed_vs_baseline"] / speeds[copy]["speed_vs_baseline"]
    return speeds[first]["speed_vs_baseline"] * ratio


def recipe_table() -> str:
    baseline = load(RECIPE / "baseline-quiet.json")
    base_seconds = baseline["accuracy_run"]["train_seconds"]
    base_epochs = baseline["train_params"]["epochs"]
    base_val = baseline["train_params"]["val_size"]
    speeds = {}
    for name in ("cost-ablation.json", "cost-width.json", "cost-crop.json", "cost-batch.json"):
        speeds |= load(RECIPE / name)["variants"]
    first = baseline["accuracy_run"]
    accuracies = [first["test_accuracy_ten_crop"]]
    rows = [
        [
            BASELINE,
            pct(accuracies[0]),
            pct(first["test_accuracy_center_crop"]),
            "",
            f"{base_seconds:.0f} (measured, quiet)",
            rel(RECIPE / "baseline-quiet.json"),
        ]
    ]
    for name, weights, variant, changes, change in ABLATION:
        run = load(RECIPE / f"{name}-seed42.json")
        if run is None:
            break  # the rows after it build on it
        tested = run["without_average"] if weights == "raw" and run.get("without_average") else run
        acc = tested["test_accuracy_ten_crop"]
        speed = step_speed(speeds, variant)
        epochs = run["train_params"]["epochs"]
        # more images trained per epoch, priced as training steps: an upper estimate, since the
        # validation pass they replace was counted as training too
        images = (TRAIN_IMAGES - run["train_params"]["val_size"]) / (TRAIN_IMAGES - base_val)
        seconds = f"≈ {base_seconds * epochs * images / base_epochs / speed:.0f} (×{1 / speed:.2f} per step"
        seconds += f", ×{images:.2f} the images)" if images != 1 else ")"
        source = rel(RECIPE / f"{name}-seed42.json") + (" (raw weights)" if tested is not run else "")
        delta = f"{100 * (acc - accuracies[changes - 1]):+.2f} (on {changes})"
        rows.append([f"{len(rows) + 1}. {changes} + {change}", pct(acc)])
        rows[-1] += [pct(tested["test_accuracy_center_crop"]), delta, seconds, source]
        accuracies.append(acc)
    return table(
        ["recipe", "test acc. (10-crop)", "centre crop", "Δ points", "training s", "source"],
        rows,
    )


def seeds_table() -> str:
    runs = [(load(p), p) for p in sorted(RECIPE.glob("final-seed*.json"))]
    if not runs:
        return "_No multi-seed runs yet (`make bench-recipe`)._"
    timed_path = RESULTS / "train-cpu-default.json"  # `make bench`'s timed run: seed 42, the same recipe?
    timed = load(timed_path)
    if timed["train_params"] == runs[0][0]["train_params"] and all(r["seed"] != 42 for r, _ in runs):
        runs.insert(0, ({"seed": 42} | timed["accuracy_run"], timed_path))
    rows = [
        [str(r["seed"]), pct(r["test_accuracy_ten_crop"]), pct(r["test_accuracy_center_crop"]), rel(path)]
        for r, path in runs
    ]
    tens = [r["test_accuracy_ten_crop"] for r, _ in runs]
    spread = f"mean {pct(statistics.mean(tens))}, min {pct(min(tens))}, max {pct(max(tens))}"
    if len(tens) > 1:
        spread += f", sd {100 * statistics.stdev(tens):.2f} points"
    rows.append(["all", spread, "", ""])
    return table(["seed", "test acc. (10-crop)", "centre crop", "source"], rows)


def throughput_table() -> str:
    rows = []
    for path in sorted(RESULTS.glob("train-cpu-*.json")):
        r = load(path)
        opts, ours = r["train_params"], r["alexops"]
        config = f"{opts['image_size']} px, width {opts['width']:g}" + (
            ", bf16" if opts.get("amp") else ", fp32"
        )
        seed = r.get("seed")
        if seed:
            low, high = min(r["speedup_vs_seed_by_round"]), max(r["speedup_vs_seed_by_round"])
            versus = (
                f"{seed['img_per_s']:.0f} img/s → **{r['speedup_vs_seed']:.2f}×** ({low:.2f}–{high:.2f}×)"
            )
        else:
            versus = "not measured"
        gflops = ours["img_per_s"] * ours["gflop_per_image"]
        arithmetic = f"{gflops:.0f} (matmul {r['matmul_gflop_per_s']:.0f})"
        rows.append(
            [
                config,
                f"{ours['img_per_s']:.0f}",
                versus,
                arithmetic,
                share(ours["data_share"]),
                rel(path),
            ]
        )
    return table(
        ["training at", "alexops img/s", "seed recipe, speed-up (rounds)", "GFLOP/s", "data share", "source"],
        rows,
    )


def time_to_accuracy_table() -> str:
    path = RESULTS / "train-cpu-default.json"
    r = load(path)
    run = r["accuracy_run"]
    epochs = r["train_params"]["epochs"]
    # with train.val_size 0 nothing is validated: the training accuracy (augmented) instead
    split = "val" if r["train_params"]["val_size"] else "train"
    curve = ", ".join(
        f"{row['epoch']}: {pct(row[f'{split}_accuracy'])}"
        for row in run["history"]
        if row["epoch"] in (1, epochs // 5, 2 * epochs // 5, 3 * epochs // 5, 4 * epochs // 5, epochs)
    )
    header = [
        "default params",
        "training s",
        "test acc. (10-crop)",
        "centre crop",
        "validation accuracy by epoch" if split == "val" else "training accuracy by epoch (augmented)",
    ]
    row = [f"{epochs} epochs {r.get('date', '')}".strip(), f"{run['train_seconds']:.0f}"]
    row += [pct(run["test_accuracy_ten_crop"]), pct(run["test_accuracy_center_crop"]), curve]
    return table([*header, "source"], [[*row, rel(path)]])


def int8_table() -> str:
    path = RESULTS / "int8.json"
    r = load(path)
    if r is None:
        return "_Not measured yet (`make bench`)._"
    rows = []
    for m in r["models"]:
        model = f"{m['image_size']} px, width {m['width']:g} ({m['parameters'] / 1e6:.1f} M params)"
        acc = m["accuracy_center_crop"]
        rows.append([model, "fp32", f"{m['batch_1']['img_per_s']['fp32']:.0f}", "",
                     f"{m['batch_64']['img_per_s']['fp32']:.0f}", "", pct(acc["fp32"]), "",
                     f"{m['bytes']['fp32'] / 1e6:.1f} MB"])  # fmt: skip
        for name in acc:
            if name == "fp32":
                continue
            b1, b64 = m["batch_1"][f"{name} vs fp32"], m["batch_64"][f"{name} vs fp32"]
            rows.append(
                ["", name, f"{m['batch_1']['img_per_s'][name]:.0f}", ratio(b1),
                 f"{m['batch_64']['img_per_s'][name]:.0f}", ratio(b64), pct(acc[name]),
                 f"{m['accuracy_drop_points'][name]:.2f}", f"{m['bytes'][name] / 1e6:.1f} MB"]
            )  # fmt: skip
    header = ["model", "onnxruntime", "batch 1 img/s", "vs fp32", "batch 64 img/s", "vs fp32",
              "test acc. (centre, 10,000)", "drop (points)", "size"]  # fmt: skip
    return table(header, rows) + f"\n\nSource: {rel(path)}."


def prepare_table() -> str:
    """Folder datasets (#15): decoding speed, equivalence with the IDX path, streaming, scale."""
    rows = []
    for name, make in (("speed", speed_rows), ("equivalence", equivalence_rows), ("stream", stream_rows),
                       ("scale", scale_rows)):  # fmt: skip
        path = RESULTS / f"prepare-{name}.json"
        if found := load(path):
            rows += [[measurement, result, rel(path)] for measurement, result in make(found)]
    if not rows:
        return "_Not measured yet (`make bench-prepare`)._"
    return table(["measurement", "result", "source"], rows)


def speed_rows(r: dict) -> list[tuple[str, str]]:
    rows = []
    for photo, found in r["photos"].items():
        for size, m in found["sizes"].items():
            kilobytes = found["mean_file_bytes"] / 1e3
            what = (
                f"decode {r['images']:,} JPEGs of {photo.replace('x', '×')} px ({kilobytes:.0f} kB) "
                f"to {size} px, {r['workers']} processes"
            )
            by_round = m["speedup_by_round"]
            result = (
                f"{m['alexops_img_per_s']:.0f} vs {m['torchvision_img_per_s']:.0f} img/s: "
                f"**{m['speedup']:.2f}×** ({min(by_round):.2f}–{max(by_round):.2f}× by round)"
            )
            rows.append((what, result))
    return rows


def equivalence_rows(r: dict) -> list[tuple[str, str]]:
    idx, folder = r["runs"]["idx"], r["runs"]["folder"]
    splits = [found for name, found in r["arrays"].items() if name != "stats_equal"]
    same = all(found["pixels_identical"] and found["labels_identical"] for found in splits)
    # the run's train params (older results: the default then, dropout 0.5 without smoothing)
    train = r.get("train_params", {"dropout": 0.5, "label_smoothing": 0.0})
    what = (
        f"Fashion-MNIST as {r['png_files']:,} PNGs vs its IDX files, default params of the day "
        f"({r['epochs']} epochs, dropout {train['dropout']:g}, "
        f"label smoothing {train['label_smoothing']:g}), same seed"
    )
    result = (
        f"caches {'pixel-identical' if same else 'DIFFERENT'}; {pct(folder['accuracy'])} vs "
        f"{pct(idx['accuracy'])} (10-crop): **{r['accuracy_difference_points']:+.2f} points**"
    )
    return [(what, result)]


def stream_rows(r: dict) -> list[tuple[str, str]]:
    what = (
        f"data share of a {r['image_size']} px step (width {r['width']:g}, batch {r['batch_size']}, "
        "CPU), batches read from the memory map and augmented"
    )
    shares = [f"**{100 * m['data_share']:.1f}%** ({mode})" for mode, m in r["modes"].items()]
    return [(what, ", ".join(shares))]


def scale_rows(r: dict) -> list[tuple[str, str]]:
    runs = [r["runs"][count] for count in sorted(r["runs"], key=int)]

    def span(value: Callable[[dict], float], unit: str) -> str:
        return " → ".join(f"{value(run):,.0f}" for run in runs) + f" {unit}"

    counts = " and ".join(f"{int(count):,}" for count in sorted(r["runs"], key=int))
    what = (
        f"{counts} JPEGs (256×192): prepare and one epoch streamed (ALEXOPS_DATA_MEMORY={r['memory_budget']})"
    )
    result = (f"cache {span(lambda run: run['cache_mib'], 'MiB')}; peak anonymous memory: prepare "
              f"{span(lambda run: run['prepare']['peak_anonymous_mib'], 'MiB')}, train "
              f"{span(lambda run: run['train']['peak_anonymous_mib'], 'MiB')}; prepare "
              f"{span(lambda run: run['prepare']['seconds'], 's')}")  # fmt: skip
    return [(what, result)]


def gpu_table() -> str:
    """`make bench-gpu` (benchmarks/gpu_check.sh) on a lent GPU: its files, and those of the run
    before the training loop stopped waiting for the GPU at every step (`*-before-sync-fix`)."""
    before = " (before)"
    files = [  # (results file, its cells, what the measurement's cell adds)
        ("train-cuda-paper.json", training_cells, ""),
        ("train-cuda-paper-before-sync-fix.json", training_cells,
         " (before; data share timed with a sync after the augmentation)"),
        ("prepare-stream-cuda.json", streaming_cells, ""),
        ("prepare-stream-cuda-before-sync-fix.json", streaming_cells, before),
        ("accuracy-cuda-paper.json", accuracy_cells, ""),
        ("accuracy-cuda-paper-30-epochs.json", accuracy_cells, before),
        ("lrn-cuda.json", lrn_cells, ""),
    ]  # fmt: skip
    rows = []
    for name, cells, note in files:
        r = load(RESULTS / name)
        what, result = cells(r)
        rows.append([what + note, result, f"{r.get('device_name', r['device'])}, {rel(RESULTS / name)}"])
    return table(["measurement", "result", "card, source"], rows)


def training_cells(r: dict) -> tuple[str, str]:
    ours, seed = r["alexops"], r["seed"]
    low, high = min(ours["img_per_s_by_round"]), max(ours["img_per_s_by_round"])
    return (
        f"`paper` preset training, batch {ours['batch_size']}, bf16, channels-last, torch.compile",
        f"**{ours['img_per_s']:,.0f} img/s** (rounds {low:,.0f}–{high:,.0f}), "
        f"{ours['img_per_s'] * ours['gflop_per_image'] / 1000:.1f} TFLOP/s (bf16 matmul "
        f"{r['matmul_gflop_per_s'] / 1000:.0f}); data share {100 * ours['data_share']:.1f}%; seed recipe "
        f"{seed['img_per_s']:,.0f} img/s → {r['speedup_vs_seed']:.2f}×",
    )


def streaming_cells(r: dict) -> tuple[str, str]:
    speed, share, shape = r["img_per_s"], r["data_share"], r["cache_shape"]
    return (
        f"the training loop on a {r['cache_gib']:.1f} GiB memory-mapped {shape[1]}×{shape[2]}² cache "
        f"({r['image_size']} px, width {r['width']:g}, batch {r['batch_size']})",
        f"streamed {speed['streamed']:,.0f}, resident {speed['resident']:,.0f}, model alone "
        f"{speed['model alone']:,.0f} img/s: data share **{100 * share['streamed']:.1f}%** streamed, "
        f"{100 * share['resident']:.1f}% resident",
    )


def accuracy_cells(r: dict) -> tuple[str, str]:
    run = r["accuracy_run"]
    return (
        f"`paper` preset trained {len(run['history'])} epochs on Fashion-MNIST",
        f"**{pct(run['test_accuracy_ten_crop'])}** 10-crop, "
        f"{pct(run['test_accuracy_center_crop'])} centre, in {run['train_seconds']:.0f} s of training",
    )


def lrn_cells(r: dict) -> tuple[str, str]:
    speedups = [e["speedup_fwd_bwd"] for e in r["results"]]
    big = [e["speedup_fwd_bwd"] for e in r["results"] if "227px" in e["label"]]
    return (
        "LRN forward+backward, ours vs `nn.LocalResponseNorm`",
        f"{min(big):.2f}–{max(big):.2f}× at 227 px (conv1, conv2), {min(speedups):.2f}–{max(speedups):.2f}× "
        f"over all shapes; max relative difference {max(e['max_rel_diff_grad'] for e in r['results']):.1e}",
    )


def lrn_table() -> str:
    """`benchmarks/bench_lrn.py` on the CPU: per LRN input shape, forward+backward and forward alone."""
    path = RESULTS / "lrn.json"
    r = load(path)
    rows = [lrn_row(e) for e in r["results"]]
    header = ["input (N×C×H×W)", "forward+backward ms, torch → ours", "speed-up", "forward alone",
              "max relative difference", "saved d powers vs d recomputed"]  # fmt: skip
    step, ms = r["default_model_step"], r["default_model_step"]["ms_per_step"]
    low, high = min(step["speedup_by_round"]), max(step["speedup_by_round"])
    weights = "the same" if step["same_weights"] else "**other**"
    return (
        f"{table(header, rows)}\n\nThe default model's training step with the saved powers: "
        f"{ms['recomputed']:.1f} → {ms['saved']:.1f} ms, **{step['speedup']:.2f}×** (rounds {low:.2f}–"
        f"{high:.2f}), {weights} weights after {step['rounds'] * step['steps_per_round']} steps. "
        f"{r['device_name']}, {r['threads']} threads, malloc: {r['allocator']}, {r['date']}, {rel(path)}"
    )


def lrn_row(e: dict) -> list[str]:
    shape = "×".join(map(str, e["shape"]))
    bits = "same bits" if e["same_bits_as_recomputed"] else "**other bits**"
    return [
        f"{e['label']} ({shape})", f"{e['torch_fwd_bwd_ms']:.1f} → {e['ours_fwd_bwd_ms']:.1f}",
        f"**{e['speedup_fwd_bwd']:.2f}×**", f"{e['speedup_fwd']:.2f}×",
        f"{max(e['max_rel_diff_out'], e['max_rel_diff_grad']):.1e}",
        f"{e['saved_vs_recomputed']:.2f}× ({bits})",
    ]  # fmt: skip


def peak_rss(mib: dict) -> str:
    return f"{mib['glibc default']:.0f} → {mib['keep_freed_memory']:.0f}"


def heap_table() -> str:
    path = RESULTS / "heap.json"
    r = load(path)
    rows = []
    for name, m in r["models"].items():
        default, kept = m["img_per_s"]["glibc default"], m["img_per_s"]["keep_freed_memory"]
        low, high = min(m["speedup_by_round"]), max(m["speedup_by_round"])
        speedup = f"**{m['speedup']:.2f}×** ({low:.2f}–{high:.2f})"
        rows.append([
            f"{name} ({m['steps']} steps a process, {r['rounds']} rounds)", f"{default:.0f}", f"{kept:.0f}",
            speedup, "yes" if m["same_weights"] else "**no**", peak_rss(m["max_rss_mib"]), rel(path),
        ])  # fmt: skip
    header = ["model", "glibc's defaults, img/s", "keep_freed_memory, img/s", "speed-up (rounds)",
              "same weights", "peak RSS, MiB", "source"]  # fmt: skip
    return table(header, rows)


def ratio(entry: dict) -> str:
    return f"**{entry['median']:.2f}×** ({min(entry['by_round']):.2f}–{max(entry['by_round']):.2f})"


TABLES: dict[str, Callable[[], str]] = {
    "time-to-accuracy": time_to_accuracy_table,
    "recipe": recipe_table,
    "seeds": seeds_table,
    "throughput": throughput_table,
    "heap": heap_table,
    "lrn": lrn_table,
    "int8": int8_table,
    "prepare": prepare_table,
    "gpu": gpu_table,
}


def render(readme: str) -> str:
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- generated: {name} -->\n).*?(<!-- /generated: {name} -->)", re.S)
        if not pattern.search(readme):
            raise SystemExit(
                f"README.md has no <!-- generated: {name} --> … <!-- /generated: {name} --> block"
            )
        text = make()
        readme = pattern.sub(lambda m, text=text: m.group(1) + text + "\n" + m.group(2), readme)
    return readme


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args()
    current = args.readme.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print(
                f"{args.readme} is not what benchmarks/results says: run python benchmarks/readme_tables.py"
            )
            return 1
        return 0
    args.readme.write_text(wanted)
    print(f"rewrote the tables in {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
