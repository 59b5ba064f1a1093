"""Predicted throughput on 64-4096 GPUs per placement and mode, from the simulator calibrated on one H200 run.

What it prints (markdown, for RESULTS.md), see staleness/experiments/scale.py for the model:
1. the calibration: every measured input and what is derived from it;
2. the check: the measured H200 run (1 GPU colocated, disk sync) against its prediction, sync,
   async and their ratio side by side (tolerance: the ratio within --tolerance);
3. the slice check: a sliced prediction against the exact simulation of every engine;
4. the sweep: GPUs x placement x mode, samples/s, per GPU, per-GPU relative to the smallest
   GPU count, async/sync of the same placement and size, engine busy, trainer idle;
5. the placements ranked per GPU count and mode.

    .venv/bin/python benchmarks/sim_scale.py [--gpus 64,256,1024,4096] [--sync nccl|disk] [--slice 32]
"""

from __future__ import annotations

import argparse
import time

import msgspec

from staleness.experiments.scale import (
    PLACEMENTS,
    Reproduction,
    ScaleModel,
    ScalePrediction,
    decode_costs,
    dp_efficiency,
    padding_factor,
    predict,
    reproduce_h200,
    trainer_communication,
    trainer_costs,
    trainer_yield,
    weight_sync,
)

MODES = ("sync", "async")


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def calibration(model: ScaleModel, gpus: list[int]) -> str:
    run, cluster = model.run, model.cluster
    base, per_seq = decode_costs(run)
    fixed, per_token = trainer_costs(run)
    lines = [
        f"- decode step {1e3 * base:.2f} ms + {1e6 * per_seq:.1f} us per running sequence "
        f"(SGLang {run.sglang_tokens_per_s:,.0f} tok/s at {run.sglang_concurrency} concurrent; sync run's generation "
        f"{run.sync_period_s - run.train_alone_s - run.sync_run_weight_sync_s:.3f} s per batch of "
        f"{run.samples_per_engine_gpu}, tail at the {run.max_new_tokens} cap)",
        f"- train step of a rank alone {fixed:.3f} s + {1e6 * per_token:.1f} us per real token (trainer benchmark "
        f"{run.trainer_tokens_per_s:,.0f} padded tok/s x padding {padding_factor(run):.2f}; measured {run.train_alone_s} s "
        f"for {run.train_tokens:,.0f} tokens)",
        f"- colocated trainer yields: a step runs {1 + trainer_yield(run):.1f}x slower while engines generate "
        f"(fitted: simulated train steps average the measured {run.train_beside_engine_s} s); engines keep their speed",
        f"- disk sync (1 GPU): trainer export {run.export_s} s, engines' load {run.load_s} s beside the next train step",
    ]
    rows = []
    for n in gpus:
        comm_step, comm_token = trainer_communication(n, run, cluster)
        _, nccl, _ = weight_sync(n, n, model)
        _, disk, _ = weight_sync(n, n, msgspec.structs.replace(model, sync="disk"))
        rows.append(
            [
                str(n),
                f"{1e3 * comm_step:.1f}",
                f"{1e6 * comm_token:.2f}",
                f"{dp_efficiency(n, run.train_tokens, run, cluster):.3f}",
                f"{1e3 * nccl:.1f}",
                f"{disk:.2f}",
            ]
        )
    header = [
        "N (trainer GPUs, engines)",
        "HSDP per step ms",
        "HSDP us/token",
        f"DP efficiency, {run.train_tokens:,.0f} tokens/rank",
        "NCCL sync ms",
        "disk sync s",
    ]
    return "\n".join(lines) + "\n\n" + markdown(header, rows)


def reproduction(rep: Reproduction, eta: int, tolerance: float) -> str:
    rows = [
        [name, f"{measured:.1f}", f"{predicted:.1f}", f"{100 * (predicted / measured - 1):+.1f}%"]
        for name, measured, predicted in (
            ("sync samples/s", rep.measured_sync, rep.predicted_sync),
            (f"async eta={eta} samples/s", rep.measured_async, rep.predicted_async),
        )
    ]
    rows.append(
        [
            "**async/sync**",
            f"**{rep.measured_ratio:.2f}x**",
            f"**{rep.predicted_ratio:.2f}x**",
            f"**{100 * rep.ratio_error:+.1f}%**",
        ]
    )
    verdict = f"ratio within ±{100 * tolerance:.0f}%: **{'met' if abs(rep.ratio_error) <= tolerance else 'NOT met'}**"
    return markdown(["1 GPU colocated, disk sync", "measured (H200)", "predicted", "error"], rows) + "\n\n" + verdict


def slice_check(model: ScaleModel, gpus: int) -> str:
    rows = []
    for placement in (PLACEMENTS[0], PLACEMENTS[1], PLACEMENTS[3]):
        for mode in MODES:
            sliced = predict(gpus, placement, mode, 2, model)
            exact = predict(gpus, placement, mode, 2, msgspec.structs.replace(model, slice_engines=gpus))
            rows.append(
                [
                    placement.label,
                    mode,
                    f"{sliced.simulated_engines} of {exact.simulated_engines}",
                    f"{sliced.samples_per_s:,.0f}",
                    f"{exact.samples_per_s:,.0f}",
                    f"{100 * (sliced.samples_per_s / exact.samples_per_s - 1):+.1f}%",
                ]
            )
    return markdown([f"{gpus} GPUs", "mode", "engines simulated", "sliced samples/s", "exact", "error"], rows)


def sweep(model: ScaleModel, gpus: list[int]) -> dict[tuple, ScalePrediction]:
    return {
        (n, placement.label, mode): predict(n, placement, mode, 2, model)
        for n in gpus
        for placement in PLACEMENTS
        for mode in MODES
    }


def sweep_table(points: dict[tuple, ScalePrediction], gpus: list[int]) -> str:
    rows = []
    for (n, label, mode), p in points.items():
        sync = points[(n, label, "sync")]
        first = points[(gpus[0], label, mode)]
        rows.append(
            [
                str(n),
                label,
                mode if mode == "sync" else f"async eta={p.eta}",
                f"{p.engine_gpus}/{p.trainer_gpus}",
                f"{p.samples_per_s:,.0f}",
                f"{p.samples_per_s_per_gpu:.2f}",
                f"{p.samples_per_s_per_gpu / first.samples_per_s_per_gpu:.3f}",
                f"**{p.samples_per_s / sync.samples_per_s:.2f}x**" if mode != "sync" else "",
                f"{p.engine_busy:.2f}",
                f"{p.trainer_idle:.2f}",
                f"{p.train_step_s:.2f}",
            ]
        )
    header = [
        "GPUs",
        "placement",
        "mode",
        "engine/trainer GPUs",
        "samples/s",
        "per GPU",
        f"per GPU vs {gpus[0]}",
        "async/sync",
        "engine busy",
        "trainer idle",
        "train step s",
    ]
    return markdown(header, rows)


def ranking(points: dict[tuple, ScalePrediction], gpus: list[int]) -> str:
    """Placements per GPU count and mode, best first; '=' joins predictions within 0.5% of each other."""
    rows = []
    for n in gpus:
        for mode in MODES:
            ranked = sorted(
                (p for (g, _, m), p in points.items() if g == n and m == mode), key=lambda p: -p.samples_per_s
            )
            text = f"{ranked[0].placement} {ranked[0].samples_per_s_per_gpu:.1f}"
            for before, p in zip(ranked, ranked[1:]):
                tied = p.samples_per_s >= 0.995 * before.samples_per_s
                text += f" {'=' if tied else '>'} {p.placement} {p.samples_per_s_per_gpu:.1f}"
            runner_up = next((p for p in ranked if p.samples_per_s < 0.995 * ranked[0].samples_per_s), ranked[-1])
            rows.append([str(n), mode, text, f"{ranked[0].samples_per_s / runner_up.samples_per_s:.2f}x"])
    return markdown(["GPUs", "mode", "placements by samples/s per GPU", "best / next distinct"], rows)


def one_gpu(model: ScaleModel) -> str:
    """The measured GPU with the sync the sweep assumes: how much of the 1-GPU gain the disk export gave."""
    rows = []
    for placement in PLACEMENTS[:2]:
        sync, asynchronous = (predict(1, placement, mode, 2, model) for mode in MODES)
        rows.append(
            [
                placement.label,
                f"{sync.samples_per_s:.1f}",
                f"{asynchronous.samples_per_s:.1f}",
                f"**{asynchronous.samples_per_s / sync.samples_per_s:.2f}x**",
                f"{asynchronous.train_step_s:.2f}",
            ]
        )
    return markdown(
        [f"1 GPU, {model.sync} sync", "sync samples/s", "async samples/s", "async/sync", "train step s"], rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="64,256,1024,4096")
    parser.add_argument("--sync", choices=("nccl", "disk"), default="nccl", help="weight sync method at scale")
    parser.add_argument("--slice", type=int, default=32, help="engines simulated exactly per point")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=0.25, help="allowed relative error of the 1-GPU ratio")
    parser.add_argument("--check-slice-at", type=int, default=256, help="GPUs of the slice check (0: skip)")
    args = parser.parse_args()
    gpus = [int(g) for g in args.gpus.split(",")]
    model = ScaleModel(sync=args.sync, slice_engines=args.slice, steps=args.steps, seed=args.seed)
    started = time.perf_counter()

    print("### Calibration (one H200, benchmarks/RESULTS.md)\n")
    print(calibration(model, gpus))
    print("\n### Check against the GPU run\n")
    rep = reproduce_h200(model)
    print(reproduction(rep, model.run.eta, args.tolerance))
    print()
    print(one_gpu(model))
    if args.check_slice_at:
        print(f"\n### Slice check ({args.slice} engines simulated vs all)\n")
        print(slice_check(model, args.check_slice_at))
    points = sweep(model, gpus)
    print(f"\n### Sweep ({args.sync} weight sync, {args.slice} engines simulated per point, {args.steps} steps)\n")
    print(sweep_table(points, gpus))
    print("\n### Best placement\n")
    print(ranking(points, gpus))
    elapsed = time.perf_counter() - started
    print(
        f"\nRESULT sim_scale sync={args.sync} gpus={args.gpus} slice={args.slice} steps={args.steps} "
        f"h200_ratio_measured={rep.measured_ratio:.2f} h200_ratio_predicted={rep.predicted_ratio:.2f} "
        f"check={'met' if abs(rep.ratio_error) <= args.tolerance else 'not_met'} seconds={elapsed:.0f}"
    )


if __name__ == "__main__":
    main()
