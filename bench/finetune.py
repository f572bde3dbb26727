"""Fine-tuning a KoGPT2-base-shaped model on this machine: `stage=train experiment=finetune` on a random GPT-2 of
KoGPT2's shape (12 layers, 12 heads, d_model 768, vocabulary 51,200, context 256; random weights, ../shared's real
KoGPT2 tokenizer), with AdamW as the preset has it. Reports tokens/s, the peak resident memory of the training process,
the tokens of one epoch of ../shared's NSMC stand-in in KoGPT2's tokenizer, and that epoch's time here and, from FLOPs,
on one H100.

    uv run python bench/finetune.py [--steps 8] [--batch 8] [--reviews 40000]

Needs ../shared. Prints the machine line (bench/harness.py), then the figures as JSON. The epoch's tokens are counted
on a sample of `--reviews` reviews and scaled to all 675,798.
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import harness

KOGPT2 = harness.SHARED / "tokenizers" / "kogpt2-v1"
KOGPT2_BASE = {"vocab_size": 51200, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}  # skt/kogpt2-base-v2
H100_BF16_DENSE = 989e12  # FLOP/s, the peak kr3's MFU table uses
MFU = 0.40  # an assumed fraction of that peak for a 125M model at block 256 (not measured here)


def random_kogpt2(folder: Path) -> None:
    import torch
    import transformers

    shutil.copytree(KOGPT2, folder)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**KOGPT2_BASE)).save_pretrained(folder)


def sample(reviews: int, out: Path) -> tuple[Path, float]:
    """A random sample of the NSMC stand-in as a parquet file, and the share of all reviews it is."""
    import pandas as pd

    df = pd.read_parquet(harness.require_nsmc())
    df.sample(n=reviews, random_state=0).to_parquet(out)
    return out, reviews / len(df)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reviews", type=int, default=40000)
    args = ap.parse_args()
    print(harness.machine_line(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        random_kogpt2(tmp / "kogpt2-shaped")
        data, share = sample(args.reviews, tmp / "sample.parquet")
        run = harness.run_kr3(
            "stage=train", "experiment=finetune", f"model.name_or_path={tmp / 'kogpt2-shaped'}", *harness.local_data(data),
            f"paths.root_dir={tmp}", "logger=none", "trainer.sample_prompts=[]", f"trainer.max_steps={args.steps}",
            f"trainer.batch_size={args.batch}", "trainer.log_interval=1", "trainer.eval_interval=0",
            "trainer.final_eval_tokens=2048", "trainer.ckpt_interval=0", run_dir=tmp / "run", env={"WANDB_MODE": "disabled"})
        tps = harness.train_speed(run.dir, skip=2, drop_last=False)["tokens_per_s"]  # steps 3.. (log_interval 1)
        peak_gib = run.peak_rss_mib / 1024
        wall = run.wall_s
        meta = json.loads(next((tmp / "data").glob("local-*/meta.json")).read_text())
        tokens = sum(s["tokens"] for s in meta["splits"].values()) / share
    from kr3.model import GPT, GPTConfig  # FLOPs per token of that shape, as the trainer counts them for MFU

    with __import__("torch").device("meta"):
        model = GPT(GPTConfig(vocab_size=51200, n_layers=12, n_heads=12, d_model=768, d_ffn=3072, block_size=256))
    flops = model.flops_per_token()
    h100_s = tokens * flops / (H100_BF16_DENSE * MFU)
    print(json.dumps({"params_M": round(model.num_params() / 1e6, 1), "tokens_per_s": round(tps, 1),
                      "peak_rss_GiB": round(peak_gib, 2), "run_wall_s": round(wall, 1),
                      "epoch_tokens_M": round(tokens / 1e6, 2), "epoch_hours_here": round(tokens / tps / 3600, 1),
                      "epoch_minutes_h100_at_40pct_mfu": round(h100_s / 60, 2), "flops_per_token_G": round(flops / 1e9, 3)},
                     indent=2))


if __name__ == "__main__":
    main()
