"""Command line: ``infoquant-export quantize | eval | generate``.

Bad input exits with code 2 and one line naming the problem and the fix; Ctrl-C exits with 130 and leaves no
partial output.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from infoquant_export.config import ROTATIONS, WEIGHT_METHODS, CalibrationConfig, QuantConfig
from infoquant_export.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda[:N]")


def _add_quantize(sub: Any) -> None:
    p = sub.add_parser("quantize", help="rotate and quantize a model into an artifact directory")
    p.add_argument("--model", required=True, help="demo | path to a .gguf file | Hugging Face model directory")
    p.add_argument("--rotation", default="hadamard", choices=ROTATIONS)
    p.add_argument("--rotation-blocks", type=int, default=1, help="block-diagonal residual rotation (1, 2 or 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized Hadamard and calibration windows")
    p.add_argument("--weights", default="gptq", choices=WEIGHT_METHODS)
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=4)
    p.add_argument("--kv-bits", type=int, default=4)
    p.add_argument("--a-clip-ratio", type=float, default=0.9)
    p.add_argument("--kv-clip-ratio", type=float, default=0.95)
    p.add_argument("--no-clip-search", action="store_true", help="plain max-abs weight scales (no MSE search)")
    p.add_argument("--calib-corpus", default="default", help="default | wikitext2 | path to .txt file or directory")
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--out", required=True, help="new artifact directory (must not exist)")
    _add_device(p)


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="perplexity of an artifact (fake quant) or a full-precision model")
    p.add_argument("target", nargs="?", help="artifact directory written by quantize")
    p.add_argument("--model", help="full-precision model instead: demo | .gguf | HF directory")
    p.add_argument("--corpus", "--dataset", dest="corpus", default="default",
                   help="default | wikitext2 | path to .txt file or directory")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_device(p)


def _add_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="greedy chat reply from an artifact or a full-precision model")
    p.add_argument("target", nargs="?", help="artifact directory written by quantize")
    p.add_argument("--model", help="full-precision model instead: demo | .gguf | HF directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true")
    _add_device(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="infoquant-export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_quantize(sub)
    _add_eval(sub)
    _add_generate(sub)
    return parser


def _target(args: argparse.Namespace) -> str:
    if bool(args.target) == bool(args.model):
        raise UserError("give exactly one of an artifact directory or --model", f"e.g. infoquant-export {args.command} "
                        "out/demo-w4a4kv4 or --model demo")
    return args.target or args.model


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise UserError(f"invalid {name} {value}", "use a positive integer")


def cmd_quantize(args: argparse.Namespace) -> dict[str, Any]:
    from infoquant_export.pipeline import quantize_to_dir, resolve_device

    _positive("--calib-windows", args.calib_windows)
    _positive("--calib-seq-len", args.calib_seq_len)
    cfg = QuantConfig(
        w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits, weights=args.weights, rotation=args.rotation,
        rotation_blocks=args.rotation_blocks, rotation_seed=args.seed, w_clip_search=not args.no_clip_search,
        a_clip_ratio=args.a_clip_ratio, kv_clip_ratio=args.kv_clip_ratio,
        calibration=CalibrationConfig(args.calib_corpus, args.calib_windows, args.calib_seq_len, args.seed),
    ).validate()
    return quantize_to_dir(args.model, cfg, args.out, resolve_device(args.device))


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from infoquant_export.pipeline import evaluate, load_for_eval, resolve_device

    _positive("--seq-len", args.seq_len)
    target = _target(args)
    model, tokenizer, label = load_for_eval(target, resolve_device(args.device))
    result = evaluate(model, tokenizer, args.corpus, args.seq_len, args.max_windows, args.batch_size)
    return {"model": target, "config": label, **result}


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    from infoquant_export.eval.generate import chat
    from infoquant_export.pipeline import load_for_eval, resolve_device

    model, tokenizer, label = load_for_eval(_target(args), resolve_device(args.device))
    return {"config": label, **chat(model, tokenizer, args.prompt, args.max_new_tokens)}


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "generate": cmd_generate}


def _report(command: str, result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    elif command == "generate":
        print(result["text"])
    elif command == "eval":
        print(f"{result['config']}: ppl {result['ppl']:.3f} on {result['corpus']} "
              f"({result['windows']} windows x {result['seq_len']} tokens)")
    else:
        print(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = COMMANDS[args.command](args)
    except UserError as err:
        print(f"infoquant-export: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("infoquant-export: interrupted; no partial output was left", file=sys.stderr)
        return 130
    _report(args.command, result, getattr(args, "json", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
