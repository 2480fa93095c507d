"""Does distillation help? A `debug` student distilled from a pretrained `tiny` teacher against the
same student trained with CE only, on CPU, in one script run.

    python scripts/bench/distill_evidence.py [--workdir runs/distill-evidence] [--quick]

1. Tokenizer and data: a BPE of --vocab-size trained on data/samples/tinyshakespeare.txt, and the
   file prepared once (`engine.data.prepare.prepare`, every --val-every-th paragraph held out). Both
   models use this tokenizer, as distillation requires.
2. Teacher: launcher/pretrain.py --preset tiny for --teacher-steps on the training split. Reused
   when the work directory already holds one trained with the same settings (teacher.json).
3. Students: one `debug` model built with --seed, saved once; both runs start from it
   (launcher/distill.py --init-from INIT --teacher TEACHER) with the same seed, data, batches,
   steps, lr schedule and tokens, and differ only in --kd-alpha: 1 (CE only: the divergence is
   computed but weighs 0) against --kd-alpha A with --kd-loss and --kd-temperature.
   A third run, distilled_top{K}, is the distilled one trained from the teacher's stored top-K
   log-probs (--teacher-top-k K: computed once at its start, no teacher loaded while training).
4. Held-out measures, by this script after training, on every --seq-len window of the held-out
   split (text none of the three models trained on): the student's CE (mean token NLL) and the
   KL(teacher || student) per token at temperature 1, i.e. how far the student's next-token
   distribution is from the teacher's. Both are means over the same tokens; ratios are distilled
   / CE-only (below 1: distillation helped).
5. The top-k loss against the full loss, on the same held-out tokens, for the initial and the
   distilled student and k = 8, K and 256: each divergence (forward KL, reverse KL, JSD with beta 0.5) at --kd-temperature,
   computed on the full vocabulary and on the k + 1 buckets of engine.objectives.teacher (the teacher's
   k most likely tokens and the rest), as a distill run with --teacher-top-k k trains on.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import hf_trainer as bench  # noqa: E402  (launch, run: torchrun / plain python with the same environment)

TEXT = ROOT / "data" / "samples" / "tinyshakespeare.txt"
RUNS = ("ce_only", "distilled", "distilled_topk")
KINDS = ("forward_kl", "reverse_kl", "jsd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/distill-evidence", help="tokenizer, data, teacher, students, result.json")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--val-every", type=int, default=20, help="hold out every k-th paragraph of the text")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--teacher-steps", type=int, default=200)
    p.add_argument("--teacher-lr", type=float, default=2e-3)
    p.add_argument("--student-steps", type=int, default=100)
    p.add_argument("--student-lr", type=float, default=3e-3)
    p.add_argument("--kd-loss", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--kd-alpha", type=float, default=0.1, help="the distilled run's CE weight (CE only: 1)")
    p.add_argument("--top-k", type=int, default=64, help="log-probs a token of the distilled_topk run keeps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="OpenMP threads a rank")
    p.add_argument("--eval-windows", type=int, default=0, help="held-out windows measured (0: all)")
    p.add_argument("--quick", action="store_true", help="a smoke run: small vocab, few steps (the test's settings)")
    args = p.parse_args(argv)
    if args.quick:
        args.vocab_size, args.seq_len, args.micro_batch_size = 512, 64, 8
        args.teacher_steps, args.student_steps = 120, 40
    return args


def prepare(args, work: Path) -> tuple[Path, Path]:
    """The tokenizer and the prepared text (train and held-out splits), made once per work directory."""
    from engine.data.prepare import prepare as prepare_data
    from engine.data.text import read_documents
    from model.tokenizer import load_tokenizer, train_tokenizer

    tok, data = work / "tokenizer", work / "data"
    if not (tok / "tokenizer.json").exists():
        train_tokenizer(read_documents(str(TEXT)), args.vocab_size, str(tok), show_progress=False)
    prepare_data("pretrain", [str(TEXT)], load_tokenizer(str(tok)), data, val_fraction=1 / args.val_every,
                 show_progress=False)
    return tok, data


def common_flags(args, out: Path, steps: int, lr: float) -> list[str]:
    flags = {"output-dir": out, "seq-len": args.seq_len, "micro-batch-size": args.micro_batch_size // args.ranks,
             "grad-accum": 1, "max-steps": steps, "warmup-steps": max(1, steps // 20), "lr": lr, "precision": "fp32",
             "zero-stage": 0, "seed": args.seed, "log-interval": max(1, steps // 10), "eval-interval": 0,
             "eval-samples": 4 * args.micro_batch_size, "save-interval": 10 ** 6, "resume": "never"}
    return [str(x) for k, v in flags.items() for x in (f"--{k}", v)]


def train_teacher(args, tok: Path, data: Path, work: Path) -> Path:
    """launcher/pretrain.py --preset tiny, or the teacher an earlier run of this script made with the same settings."""
    out = work / "teacher"
    key = {"vocab_size": args.vocab_size, "val_every": args.val_every, "seq_len": args.seq_len,
           "micro_batch_size": args.micro_batch_size, "steps": args.teacher_steps, "lr": args.teacher_lr,
           "seed": args.seed}
    if (out / "final" / "config.json").exists() and (work / "teacher.json").exists():
        if json.loads((work / "teacher.json").read_text()) == key:
            print(f"teacher: reusing {out}", flush=True)
            return out / "final"
    start = time.time()
    cmd = bench.launch([str(ROOT / "launcher" / "pretrain.py"), "--preset", "tiny", "--tokenizer", str(tok),
                        "--data", str(data)] + common_flags(args, out, args.teacher_steps, args.teacher_lr), args.ranks)
    bench.run(cmd, args.threads, "teacher pretraining")
    (work / "teacher.json").write_text(json.dumps(key))
    print(f"teacher: {args.teacher_steps} steps in {time.time() - start:.0f} s", flush=True)
    return out / "final"


def student_init(args, tok: Path, work: Path) -> Path:
    """One `debug` model built with --seed, saved with the tokenizer: both students start from these weights."""
    import torch

    from model.build import build_model
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tok))
    torch.manual_seed(args.seed)
    model = build_model("debug", vocab_size=len(tokenizer))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, name, getattr(tokenizer, name))
    out = work / "student-init"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def train_students(args, init: Path, teacher: Path, data: Path, work: Path) -> dict[str, Path]:
    """The student runs, identical but for --kd-alpha and, for distilled_topk, --teacher-top-k."""
    runs = {}
    for name, alpha, top_k in (("ce_only", 1.0, 0), ("distilled", args.kd_alpha, 0),
                               ("distilled_topk", args.kd_alpha, args.top_k)):
        out = work / name
        shutil.rmtree(out, ignore_errors=True)  # this script's own earlier run
        start = time.time()
        cmd = bench.launch([str(ROOT / "launcher" / "distill.py"), "--init-from", str(init), "--teacher", str(teacher),
                            "--data", str(data), "--kd-loss", args.kd_loss, "--kd-temperature", str(args.kd_temperature),
                            "--kd-alpha", str(alpha), "--teacher-top-k", str(top_k)]
                           + common_flags(args, out, args.student_steps, args.student_lr), args.ranks)
        bench.run(cmd, args.threads, f"student {name}")
        print(f"student {name}: {args.student_steps} steps in {time.time() - start:.0f} s", flush=True)
        runs[name] = out / "final"
    return runs


def held_out(models: dict[str, Path], teacher: Path, data: Path, seq_len: int, windows: int = 0,
             batch_size: int = 16) -> dict[str, dict[str, float]]:
    """Per student: mean token CE on the held-out split and mean KL(teacher || student) per token at T = 1."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.data.collate import collate_stack
    from engine.data.text import PretrainDataset
    from engine.objectives.distill import token_divergence
    from engine.objectives.tokens import token_nll_sum, trained_tokens

    dataset = PretrainDataset(data, "val", seq_len)
    count = len(dataset) if windows <= 0 else min(windows, len(dataset))
    if count == 0:
        raise SystemExit(f"{data}: the held-out split fills no window of {seq_len} tokens; lower --seq-len")
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    teacher_model, students = load(teacher), {name: load(path) for name, path in models.items()}
    sums = {name: {"ce": 0.0, "kl": 0.0} for name in [*students, "teacher"]}
    tokens = 0
    with torch.no_grad():
        for start in range(0, count, batch_size):
            batch = collate_stack([dataset[i] for i in range(start, min(start + batch_size, count))])
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            mask = trained_tokens(batch["labels"])
            tokens += int(mask.sum())
            teacher_logits = teacher_model(**inputs).logits
            sums["teacher"]["ce"] += float(token_nll_sum(teacher_logits, batch["labels"]))
            for name, model in students.items():
                logits = model(**inputs).logits
                sums[name]["ce"] += float(token_nll_sum(logits, batch["labels"]))
                vocab = logits.shape[-1]
                sums[name]["kl"] += float(token_divergence(logits[mask], teacher_logits[..., :vocab][mask],
                                                           "forward_kl").sum())
    return {name: {k: v / tokens for k, v in s.items()} | {"tokens": tokens} for name, s in sums.items()}


def top_k_gap(models: dict[str, Path], teacher: Path, data: Path, seq_len: int, ks: list[int], temperature: float,
              windows: int = 0, batch_size: int = 16) -> dict[str, dict[str, dict[str, float]]]:
    """Per k, model and divergence: its mean per held-out token on the full vocabulary and on the
    teacher's top-k buckets (what --teacher-top-k trains on), and their ratio."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from engine.data.collate import collate_stack
    from engine.data.text import PretrainDataset
    from engine.objectives.distill import token_divergence
    from engine.objectives.teacher import bucketed, top_k
    from engine.objectives.tokens import trained_tokens

    dataset = PretrainDataset(data, "val", seq_len)
    count = len(dataset) if windows <= 0 else min(windows, len(dataset))
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    teacher_model, students = load(teacher), {name: load(path) for name, path in models.items()}
    sums = {(k, name): {kind: {"full": 0.0, "top_k": 0.0} for kind in KINDS} for k in ks for name in students}
    tokens = 0
    with torch.no_grad():
        for start in range(0, count, batch_size):
            batch = collate_stack([dataset[i] for i in range(start, min(start + batch_size, count))])
            mask = trained_tokens(batch["labels"])
            tokens += int(mask.sum())
            soft = lambda logits: F.log_softmax(logits[mask] / temperature, dim=-1)  # noqa: E731
            t = soft(teacher_model(input_ids=batch["input_ids"]).logits)
            for name, model in students.items():
                s = soft(model(input_ids=batch["input_ids"]).logits)
                full = {kind: float(token_divergence(s, t, kind).sum()) for kind in KINDS}
                for k in ks:
                    ids, stored = top_k(t, k)
                    for kind in KINDS:
                        sums[k, name][kind]["full"] += full[kind]
                        sums[k, name][kind]["top_k"] += float(token_divergence(bucketed(s, ids), stored, kind).sum())
    return {f"top{k} {name}": {kind: {"full": v["full"] / tokens, "top_k": v["top_k"] / tokens,
                                      "ratio": v["top_k"] / v["full"]} for kind, v in per.items()}
            for (k, name), per in sums.items()}


def run(args) -> dict:
    """Everything, in order; the result (also written to WORKDIR/result.json)."""
    work = Path(args.workdir)
    if not work.is_absolute():
        work = ROOT / work
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    tok, data = prepare(args, work)
    teacher = train_teacher(args, tok, data, work)
    init = student_init(args, tok, work)
    students = train_students(args, init, teacher, data, work)
    measures = held_out(students, teacher, data, args.seq_len, args.eval_windows)
    gap = top_k_gap({"init": init, "distilled": students["distilled"]}, teacher, data, args.seq_len,
                    sorted({8, args.top_k, 256}), args.kd_temperature, args.eval_windows)
    result = {"settings": {k: v for k, v in vars(args).items() if k != "workdir"}, "held_out": measures,
              "ratios": {m: measures["distilled"][m] / measures["ce_only"][m] for m in ("ce", "kl")},
              "ratios_topk": {m: measures["distilled_topk"][m] / measures["ce_only"][m] for m in ("ce", "kl")},
              "top_k_gap": gap, "seconds": round(time.time() - start)}
    (work / "result.json").write_text(json.dumps(result, indent=2))
    return result


def print_result(result: dict) -> None:
    m = result["held_out"]
    print(f"\nheld-out tokens: {m['teacher']['tokens']:,}; teacher CE {m['teacher']['ce']:.4f} "
          f"(ppl {math.exp(m['teacher']['ce']):.1f})")
    print(f"{'student':<14} {'val CE':>8} {'ppl':>8} {'KL(teacher||student)':>22}")
    for name in RUNS:
        print(f"{name:<14} {m[name]['ce']:>8.4f} {math.exp(m[name]['ce']):>8.1f} {m[name]['kl']:>22.4f}")
    for key, name in (("ratios", "distilled"), ("ratios_topk", "distilled_topk")):
        r = result[key]
        print(f"{'ratio':<14} {r['ce']:>8.3f} {'':>8} {r['kl']:>22.3f}   ({name} / CE only; < 1: distillation helped)")
    print(f"\ntop-k divergence / full divergence, per held-out token (T = {result['settings']['kd_temperature']}):")
    for name, per in result["top_k_gap"].items():
        print(f"  {name:<15} " + "  ".join(f"{kind} {v['top_k']:.4f}/{v['full']:.4f} = {v['ratio']:.4f}"
                                         for kind, v in per.items()))
    print(f"total {result['seconds']} s")


def main(argv: list[str] | None = None) -> None:
    print_result(run(parse_args(argv)))


if __name__ == "__main__":
    main()
