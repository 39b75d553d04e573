"""Training speed and memory: dha's training loop against a plain Hugging Face training step.

For each model (SmolLM2-135M, the built-in default; a 14M-parameter LLaMA-style MHA model, random)
and each dtype (fp32; bf16 autocast), two implementations train on the same batch from the same
weights:
- dha:  dha.train.train (our Transformer, the full loop: data order, accumulation, clipping,
        schedule, logging), one micro batch per step;
- hf:   LlamaForCausalLM(labels=ids).loss, backward, clip_grad_norm_, AdamW.step, zero_grad.
Each (model, dtype, implementation) runs in its own subprocess, so its peak memory is its own:
peak_mb is the highest resident set size sampled (every 5 ms) during the training steps, minus
the resident size just before the first step (weights, gradients and optimizer state that appear
during training are included; the loaded weights are not). Tokens/s is over the steps after the
first (which is a warm-up). The step-1 losses of the two implementations are printed: they agree
(fp32) because the weights and batch are the same.

    python benchmarks/train_speed.py                       # defaults: batch 4 x 256, 5 timed steps
    python benchmarks/train_speed.py --steps 2 --batch 2 --block 64 --models tiny

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Sample the resident set size in a thread; .peak is the highest seen since start."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self._stop = every, rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def build_models(name: str):
    """(our Transformer, HF LlamaForCausalLM) holding the same float32 weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dha.families import config_from_hf, weights_from_hf, weights_to_hf
    from dha.transforms import build, state_dict_of

    if name == "smollm2":
        from dha.checkpoint import load

        ours = load(None, torch.float32, tokenizer=False).model
        hf_config = LlamaConfig.from_dict(load(None, torch.float32, tokenizer=False).hf_config)
    elif name == "tiny":
        # A 14M-parameter LLaMA-style MHA model (8k vocabulary): 6 layers, hidden 384, 6 heads of 64.
        hf_config = LlamaConfig(
            vocab_size=8192,
            hidden_size=384,
            intermediate_size=1024,
            num_hidden_layers=6,
            num_attention_heads=6,
            num_key_value_heads=6,
            head_dim=64,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
        torch.manual_seed(0)
        reference = LlamaForCausalLM(hf_config)
        cfg = config_from_hf(hf_config)
        ours = build(cfg, {k: v.detach().clone() for k, v in weights_from_hf(reference.state_dict(), cfg).items()})
        del reference
    else:
        raise SystemExit(f"unknown model {name!r}: smollm2 | tiny")
    hf_config.quantization_config = None
    hf = LlamaForCausalLM(hf_config)
    sd = weights_to_hf(state_dict_of(ours), ours.config)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if "lm_head.weight" in missing:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tied
    return ours.float(), hf.float()


def child(args) -> dict:
    """One (model, dtype, implementation) measurement, in this process."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours, hf = build_models(args.model)
    vocab = ours.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.block), generator=torch.Generator().manual_seed(1))
    steps = args.steps + 1  # the first step is a warm-up
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if args.dtype == "bfloat16"
        else torch.autocast("cpu", enabled=False)
    )
    params = sum(p.numel() for p in ours.parameters())
    if args.impl == "dha":
        from dha.options import TrainConfig
        from dha.train import train

        del hf
        cfg = TrainConfig(
            tokens=steps * args.batch * args.block,
            block_size=args.block,
            batch_tokens=args.batch * args.block,
            micro_batch=args.batch,
            dtype=args.dtype,
            eval_every=0,
            warmup_steps=1,
        )
        before = rss_mb()
        with PeakRSS() as peak:
            result = train(ours, ids, None, cfg, progress=False)
        timed = result.history[1:]
        seconds = sum(h["seconds"] for h in timed)
        loss1 = result.history[0]["loss"]
    else:
        del ours
        model = hf.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        before = rss_mb()
        times, loss1 = [], None
        with PeakRSS() as peak:
            for step in range(steps):
                t0 = time.perf_counter()
                with autocast:
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t0)
                loss1 = loss.item() if loss1 is None else loss1
        seconds = sum(times[1:])
    return {
        "model": args.model,
        "dtype": args.dtype,
        "impl": args.impl,
        "params": params,
        "batch": args.batch,
        "block": args.block,
        "steps": args.steps,
        "tokens_per_s": args.steps * args.batch * args.block / seconds,
        "peak_mb": peak.peak - before,
        "loss_step1": loss1,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2,tiny")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--child", nargs=3, metavar=("MODEL", "DTYPE", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.model, args.dtype, args.impl = args.child
        print(json.dumps(child(args)))
        return
    rows = []
    for model in args.models.split(","):
        for dtype in args.dtypes.split(","):
            for impl in ("dha", "hf"):
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--child",
                    model,
                    dtype,
                    impl,
                    "--steps",
                    str(args.steps),
                    "--batch",
                    str(args.batch),
                    "--block",
                    str(args.block),
                    "--threads",
                    str(args.threads),
                ]
                out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"{model} {dtype} {impl} failed:\n{out.stderr}")
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(
                    f"  {model:8} {dtype:9} {impl:4} {r['tokens_per_s']:9.0f} tok/s  {r['peak_mb']:8.0f} MB",
                    file=sys.stderr,
                )
    print(
        f"\nbatch {args.batch} x {args.block} tokens, {args.steps} timed steps after 1 warm-up, "
        f"{rows[0]['threads']} threads, CPU; peak MB = resident memory added during training\n"
    )
    print(
        f"{'model':8} {'dtype':9} {'params':>8} {'dha tok/s':>10} {'hf tok/s':>9} {'ratio':>6} "
        f"{'dha MB':>7} {'hf MB':>7} {'loss1 dha':>10} {'loss1 hf':>9}"
    )
    summary = []
    for i in range(0, len(rows), 2):
        ours, hf = rows[i], rows[i + 1]
        ratio = ours["tokens_per_s"] / hf["tokens_per_s"]
        print(
            f"{ours['model']:8} {ours['dtype']:9} {ours['params'] / 1e6:7.1f}M {ours['tokens_per_s']:10.0f} "
            f"{hf['tokens_per_s']:9.0f} {ratio:6.2f} {ours['peak_mb']:7.0f} {hf['peak_mb']:7.0f} "
            f"{ours['loss_step1']:10.4f} {hf['loss_step1']:9.4f}"
        )
        summary.append(
            {
                "model": ours["model"],
                "dtype": ours["dtype"],
                "params": ours["params"],
                "dha_tokens_per_s": ours["tokens_per_s"],
                "hf_tokens_per_s": hf["tokens_per_s"],
                "dha_peak_mb": ours["peak_mb"],
                "hf_peak_mb": hf["peak_mb"],
                "dha_loss_step1": ours["loss_step1"],
                "hf_loss_step1": hf["loss_step1"],
            }
        )
    print(
        json.dumps(
            {
                "benchmark": "train_speed",
                "batch": args.batch,
                "block": args.block,
                "steps": args.steps,
                "results": summary,
            }
        )
    )


if __name__ == "__main__":
    main()
