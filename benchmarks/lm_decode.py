"""REAL-size CosyVoice2 speech-token LM on CPU with random weights: prefill, decode, bistream latency.

Measures, for fp32 and faster CPU variants (dynamic int8 Linear layers, bf16):
  - prefill + first token for a 20-token text (sft layout: sos, text, task_id; no prompt),
  - per-token decode time with the KV cache (median of N steps),
  - time to the first 15 speech tokens through ``inference_bistream`` while the text arrives at
    30 tokens/s from a producer thread (a queue-backed, blocking iterator),
  - the logit error each variant costs against fp32 (teacher-forced, 64 rows).

Random weights give the same cost as the real ones (shapes are what matters); the official
reference on this machine (fp32, 1 thread) is ~1.36 s prefill + first token, ~0.24 s/token
(~0.17 s/token without the unused lm_head), first 25 tokens ~7.1 s.

    python benchmarks/lm_decode.py --quick            # a few minutes
    python benchmarks/lm_decode.py --threads 2 --variants fp32,int8
"""

from __future__ import annotations

import argparse
import os
import sys

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--threads", type=int, default=1, help="torch/OMP intra-op threads (default 1)")
parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
parser.add_argument("--variants", default="fp32,int8,bf16", help="comma list of fp32, int8, bf16")
parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: fp32/fp16/bf16 only)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument(
    "--json", default=None, help="also write the tables to this file (the GPU suite reads it)"
)
parser.add_argument(
    "--batches",
    type=int,
    nargs="*",
    default=[1, 4, 8, 16],
    help="batched decode: requests stepped together by the LM stage's packed forward",
)
args = parser.parse_args()
os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
os.environ.setdefault("MKL_NUM_THREADS", str(args.threads))

import json  # noqa: E402
import queue  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import count_syncs  # noqa: E402

from cosyvoice.config import LLMConfig  # noqa: E402
from cosyvoice.kv_cache import KVPool  # noqa: E402
from cosyvoice.llm import ROW_SPEECH, ROW_TASK, ROW_TEXT, Qwen2LM, quantize_int8  # noqa: E402
from cosyvoice.lm_graphs import DecodeGraphs  # noqa: E402
from cosyvoice.lm_request import LMRequest  # noqa: E402
from cosyvoice.lm_stage import LMStage  # noqa: E402
from cosyvoice.sampling import RasSampler  # noqa: E402

torch.set_num_threads(args.threads)
warnings.filterwarnings("ignore", message=".*(deprecated|quantiz).*")
DEVICE = torch.device(args.device)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def build_random_real_lm(seed: int) -> Qwen2LM:
    """Real shapes, built on meta then materialised with N(0, 1/fan_in) weights (fast, no init pass)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Qwen2LM(LLMConfig())
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif p.ndim == 1:
                p.normal_(0.0, 0.02, generator=gen)
            elif isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.Embedding):
                p.normal_(0.0, 1.0, generator=gen)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
    model.reset_rotary("cpu")
    return model.eval()


class NoStopSampler:
    """RAS with the stop/fill ids masked, so random weights never end a measurement early."""

    def __init__(self, seed: int):
        self.ras = RasSampler.seeded(seed)

    def __call__(self, logp, decoded):
        logp = logp.clone()
        logp[6561:] = float("-inf")
        return self.ras(logp, decoded)


def prefill_and_decode(model: Qwen2LM, n_decode: int, repeats: int) -> tuple[float, ...]:
    """Medians of (prefill wall, prefill cpu, decode wall, decode cpu) in seconds.

    CPU time is this thread's (1 intra-op thread: all the work), so it stays meaningful when other
    processes share the machine; wall time is what a user would see on this machine right now."""
    text = list(range(1000, 1020))  # 20 text tokens
    first, first_cpu, steps, steps_cpu = [], [], [], []
    for r in range(repeats):
        wall, cpu = [], []
        sync()
        t0, c0 = time.perf_counter(), time.thread_time()
        gen = model.inference(text, sampler=NoStopSampler(r), min_token_text_ratio=0)
        for _ in range(n_decode + 1):
            next(gen)
            sync()
            wall.append(time.perf_counter())
            cpu.append(time.thread_time())
        gen.close()
        first.append(wall[0] - t0)
        first_cpu.append(cpu[0] - c0)
        steps += [b - a for a, b in zip(wall[:-1], wall[1:], strict=True)]
        steps_cpu += [b - a for a, b in zip(cpu[:-1], cpu[1:], strict=True)]
    return tuple(statistics.median(x) for x in (first, first_cpu, steps, steps_cpu))


def _paced_producer(q: queue.Queue, stop: threading.Event, rate: float, n: int) -> None:
    """Puts ``n`` text ids at ``rate`` per second (simulating an LLM's text stream), then None."""
    t_start = time.perf_counter()
    for i in range(n):
        delay = t_start + (i + 1) / rate - time.perf_counter()
        if delay > 0 and stop.wait(delay):
            break
        q.put(2000 + i)
    q.put(None)


def _queue_iter(q: queue.Queue):
    while (tok := q.get()) is not None:
        yield tok


def bistream_first_tokens(model: Qwen2LM, n_tokens: int, rate: float, repeats: int) -> tuple[float, float]:
    """Medians of (wall, cpu) seconds from the first text token's release to the n-th speech token."""
    results, results_cpu = [], []
    for r in range(repeats):
        q: queue.Queue = queue.Queue()
        stop = threading.Event()
        t0, c0 = time.perf_counter(), time.thread_time()
        worker = threading.Thread(target=_paced_producer, args=(q, stop, rate, 60), daemon=True)
        worker.start()
        gen = model.inference_bistream(_queue_iter(q), sampler=NoStopSampler(r), max_tokens=n_tokens)
        count = sum(1 for _ in gen)
        sync()
        results.append(time.perf_counter() - t0)
        results_cpu.append(time.thread_time() - c0)
        stop.set()
        worker.join()
        assert count == n_tokens
    return statistics.median(results), statistics.median(results_cpu)


def batched_decode(model: Qwen2LM, batch: int, steps: int, fixed: bool = False) -> tuple[float, float]:
    """(ms per step, speech tokens per second) with ``batch`` requests decoding together through
    ``Qwen2LM.step`` (what the LM stage runs), each at its own position in its own KV slot.
    ``fixed``: through :class:`DecodeGraphs` (CUDA graphs on a GPU, the same fixed shapes run
    eagerly elsewhere)."""
    pool = KVPool(model.kv_shape(), batch, 256, spare=fixed)
    graphs = DecodeGraphs(model, pool) if fixed else None
    caches = [pool.acquire() for _ in range(batch)]
    prompt = [(0, 0)] + [(ROW_TEXT, 1000 + i) for i in range(20)] + [(ROW_TASK, 1)]
    for k, cache in enumerate(caches):  # prefills of different lengths: positions differ per request
        model.step([(prompt[: len(prompt) - k % 5], cache)])
    for _ in range(2):  # warm-up (and, on a GPU, the graph's recording)
        model.step([([(ROW_SPEECH, 7)], cache) for cache in caches], graphs)
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        model.step([([(ROW_SPEECH, (37 * i + k) % 6561)], cache) for k, cache in enumerate(caches)], graphs)
    sync()
    per_step = (time.perf_counter() - t0) / steps
    return per_step * 1000, batch / per_step


def stage_decode(model: Qwen2LM, batch: int, tokens: int, overlap: bool) -> tuple[float, int | None]:
    """Speech tokens per second of the LM stage itself (what the service runs: steps, draws,
    tokens handed to readers) with ``batch`` unistream requests of ``tokens`` tokens each, read
    by threads of their own; with ``overlap``, RAS drawn on the device and each step enqueued
    before the previous one's tokens reach the host (``--lm-overlap``), else drawn on the host
    one step at a time.  Fixed-shape steps (CUDA graphs on a GPU) either way.  Returns the tokens
    per second and, on CUDA, how many times the timed round's ops waited for the device (torch's
    sync debug mode: an overlapped stage should wait only for the tokens of each step, which
    that mode does not count)."""
    pool = KVPool(model.kv_shape(), batch, 256, spare=True)
    graphs = DecodeGraphs(model, pool)
    graphs.capture_all()
    stage = LMStage(model, pool, max_ahead=tokens, graphs=graphs, draw_on_device=overlap, overlap=overlap)
    text = [1000 + i for i in range(tokens // 2)]  # eos is masked for the first 2 x len(text) tokens

    def one(k: int, out: list) -> None:
        sampler = model.sampler_for(torch.Generator().manual_seed(k))
        request = LMRequest(model.config, sampler, text=text, max_tokens=tokens)
        out.append(len(list(stage.submit(request).tokens_from())))

    def all_requests() -> None:
        threads = [threading.Thread(target=one, args=(k, counts)) for k in range(batch)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    try:
        for timed in (False, True):  # the first: warm-up
            counts: list[int] = []
            sync()
            t0 = time.perf_counter()
            _, syncs = count_syncs(DEVICE, all_requests) if timed else (all_requests(), None)
            elapsed = time.perf_counter() - t0
    finally:
        stage.close()
    return sum(counts) / elapsed, syncs


def teacher_forced_logits(model: Qwen2LM, dtype: torch.dtype) -> torch.Tensor:
    rows = [(0, 0)] + [(ROW_TEXT, 3000 + i) for i in range(20)] + [(ROW_TASK, 1)]
    rows += [(ROW_SPEECH, (37 * i) % 6561) for i in range(42)]
    with torch.inference_mode():
        xs = model.embed_rows(rows).to(dtype)
        return model(xs)[0].float().cpu()


def main() -> None:
    n_decode = 10 if args.quick else 50
    repeats = 1 if args.quick else 3
    order = ["fp32", "int8", "bf16", "fp16"]  # int8 quantizes the fp32 weights; bf16/fp16 cast in place
    variants = sorted({v.strip() for v in args.variants.split(",") if v.strip()}, key=order.index)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {DEVICE}, "
        f"decode steps {n_decode}, repeats {repeats}, load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs",
        flush=True,
    )

    t = time.perf_counter()
    fp32 = build_random_real_lm(args.seed)
    print(f"built REAL-size LM with random weights in {time.perf_counter() - t:.1f} s", flush=True)
    ref_logits = teacher_forced_logits(fp32.to(DEVICE), torch.float32)
    batches = []
    if args.batches:
        fixed = "CUDA graphs" if DEVICE.type == "cuda" else "fixed shapes, eager"
        print(
            f"| batch (fp32) | decode ms per step | speech tokens/s | vs batch 1 | ms per step, {fixed} "
            "| LM stage tokens/s, steps one at a time | the same, overlapped | its waits for the device |"
        )
        print("|---|---|---|---|---|---|---|---|")
        base = None
        stage_tokens = 2 * n_decode
        for b in args.batches:
            ms, tps = batched_decode(fp32, b, n_decode)
            ms_fixed, _ = batched_decode(fp32, b, n_decode, fixed=True)
            alone, _ = stage_decode(fp32, b, stage_tokens, overlap=False)
            overlapped, syncs = stage_decode(fp32, b, stage_tokens, overlap=True)
            base = base or tps
            batches.append(
                {
                    "batch": b,
                    "ms_per_step": ms,
                    "tokens_s": tps,
                    "ms_per_step_fixed": ms_fixed,
                    "stage_tokens_s": alone,
                    "stage_tokens_s_overlap": overlapped,
                    "stage_syncs_overlap": syncs,
                }
            )
            print(
                f"| {b} | {ms:.1f} | {tps:.1f} | x{tps / base:.2f} | {ms_fixed:.1f} | {alone:.1f} "
                f"| {overlapped:.1f} | {'-' if syncs is None else syncs} |",
                flush=True,
            )
        print()

    rows = []
    for name in variants:
        if name == "fp32":
            model, dtype = fp32, torch.float32
        elif name == "int8":
            if DEVICE.type != "cpu":
                continue
            model = quantize_int8(fp32)
            dtype = torch.float32
        elif name in ("bf16", "fp16"):
            dtype = torch.bfloat16 if name == "bf16" else torch.float16
            model = fp32.to(dtype)  # in place: fp32 is not used after this
            model.reset_rotary(DEVICE)
        else:
            raise SystemExit(f"unknown variant {name}")
        logits = teacher_forced_logits(model, dtype)
        err = (logits - ref_logits).abs()
        top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        prefill, prefill_cpu, step, step_cpu = prefill_and_decode(model, n_decode, repeats)
        first15, first15_cpu = bistream_first_tokens(model, 15, 30.0, repeats)
        rows.append(
            (
                name,
                prefill,
                prefill_cpu,
                step,
                step_cpu,
                first15,
                first15_cpu,
                err.max().item(),
                err.mean().item(),
                top1,
            )
        )
        print(
            f"  {name}: prefill+1st {prefill:.3f} s (cpu {prefill_cpu:.3f}), {step * 1000:.1f} ms/token "
            f"(cpu {step_cpu * 1000:.1f}), first 15 (bistream) "
            f"{first15:.2f} s (cpu {first15_cpu:.2f}), logit err max {err.max().item():.3g}",
            flush=True,
        )
        if name == "int8":
            del model

    print()
    print(
        "| variant | prefill+1st token, 20 text: wall (cpu) s | decode ms/token, median: wall (cpu) | "
        "bistream first 15 tokens @30 text tok/s: wall (cpu) s | logit err vs fp32 max / mean | top-1 agree |"
    )
    print("|---|---|---|---|---|---|")
    for name, prefill, prefill_cpu, step, step_cpu, first15, first15_cpu, emax, emean, top1 in rows:
        print(
            f"| {name} | {prefill:.3f} ({prefill_cpu:.3f}) | {step * 1000:.1f} ({step_cpu * 1000:.1f}) "
            f"| {first15:.2f} ({first15_cpu:.2f}) | {emax:.3g} / {emean:.3g} "
            f"| {top1:.0%} |"
        )
    if args.json:
        keys = (
            "variant",
            "prefill_s",
            "prefill_cpu_s",
            "step_s",
            "step_cpu_s",
            "first15_s",
            "first15_cpu_s",
            "logit_err_max",
            "logit_err_mean",
            "top1",
        )
        Path(args.json).write_text(
            json.dumps(
                {"batches": batches, "variants": [dict(zip(keys, r, strict=True)) for r in rows]}, indent=1
            )
        )
    print(
        f"(fp32 logits: std {ref_logits.std().item():.3g}, range {ref_logits.min().item():.3g}.."
        f"{ref_logits.max().item():.3g}; random weights, so errors are indicative only)"
    )
    print(
        "cpu = this thread's CPU time (1 intra-op thread), i.e. the cost on an otherwise idle core; "
        "first-15 wall includes waiting for the first 5 text tokens (0.17 s at 30/s)"
    )
    print(
        "\nofficial reference (fp32, 1 thread, same machine class): prefill+1st 1.36 s, 236-253 ms/token "
        "(174 ms without the unused lm_head), first 25 tokens 7.1 s"
    )


if __name__ == "__main__":
    main()
