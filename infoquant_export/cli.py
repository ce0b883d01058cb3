"""Command line: quantize, eval, generate, export, verify, build, run, triton-repo, jetson-bundle,
pipeline, and ``infoquant-export MODEL.onnx --engine OUT.plan`` (= ``build``).

Bad input exits with code 2 and one line naming the problem and the fix; Ctrl-C exits with 130 and leaves no
partial output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from infoquant_export.config import (
    PRESET_VALUES,
    PRESETS,
    ROTATIONS,
    WEIGHT_METHODS,
    CalibrationConfig,
    LacConfig,
    PsotConfig,
    QuantConfig,
)
from infoquant_export.errors import UserError
from infoquant_export.numerics import DEFAULT as DEFAULT_NUMERICS
from infoquant_export.numerics import PROFILES


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda[:N]")


def _add_quantize(sub: Any) -> None:
    p = sub.add_parser("quantize", help="rotate and quantize a model into an artifact directory")
    p.add_argument("--model", required=True, help="demo | path to a .gguf file | Hugging Face model directory")
    p.add_argument("--rotation", default="hadamard",
                   help=f"{' | '.join(ROTATIONS)} | infoquant:DIR (import the InfoQuant reference code's Q/*.pth)")
    p.add_argument("--rotation-blocks", type=int, default=None,
                   help="block-diagonal residual rotation (1, 2 or 4; default 1, or the imported files' count)")
    p.add_argument("--lac", action="store_true", help="learn per-quantizer activation clip factors (LAC)")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="cpu: a practical CPU run (fewer/shorter windows and epochs); reference: the InfoQuant "
                        "reference's calibration (128 x 2048 tokens everywhere); explicit options override it")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized Hadamard and calibration windows")
    p.add_argument("--weights", default="gptq", choices=WEIGHT_METHODS)
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=4)
    p.add_argument("--kv-bits", type=int, default=4)
    p.add_argument("--a-clip-ratio", type=float, default=0.9)
    p.add_argument("--kv-clip-ratio", type=float, default=None,
                   help="KV clip (default 0.95; 0.9 under --numerics infoquant-reference)")
    p.add_argument("--numerics", default=DEFAULT_NUMERICS, choices=tuple(PROFILES),
                   help="infoquant-export: true W4A4KV4, one definition for every backend (default); "
                        "infoquant-reference: reproduce the InfoQuant reference code's quirks (5-bit weight codes, "
                        "V unquantized, per-head float16 o_proj input, separate q/k/v and gate/up quantizers, "
                        "embedding mean-centring, float16 rounding points; not exportable), see docs/numerics.md")
    p.add_argument("--no-clip-search", action="store_true", help="plain max-abs weight scales (no MSE search)")
    p.add_argument("--calib-corpus", default="default", help="default | wikitext2 | path to .txt file or directory")
    p.add_argument("--calib-windows", type=int, default=None, help="GPTQ/LAC calibration windows (default 64)")
    p.add_argument("--calib-seq-len", type=int, default=None, help="tokens per calibration window (default 512)")
    p.add_argument("--out", required=True, help="new artifact directory (must not exist)")
    _add_device(p)
    for prefix, cls in (("psot", PsotConfig), ("lac", LacConfig)):
        group = p.add_argument_group(f"{prefix.upper()} hyper-parameters (defaults: the InfoQuant reference's)")
        for f in dataclasses.fields(cls):
            if f.name == "enabled":
                continue
            flag = f"--{prefix}-{f.name.replace('_', '-')}"
            kind = {bool: _bool, int: int, float: float, str: str}.get(type(f.default), int)
            group.add_argument(flag, dest=f"{prefix}__{f.name}", type=kind, default=None,
                               help=f"default {f.default}")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _section(cls: type, preset: dict[str, Any], args: argparse.Namespace, prefix: str, **extra: Any) -> Any:
    """A config dataclass from its defaults, then the preset, then explicit command-line options."""
    values = {**preset}
    for f in dataclasses.fields(cls):
        given = getattr(args, f"{prefix}__{f.name}", None)
        if given is not None:
            values[f.name] = given
    return cls(**{**values, **extra})


def _add_kernels(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernels", choices=("auto", "on", "off"), default="auto",
                   help="auto: run a W4A4KV4 artifact through the GPU kernels (packed 4-bit weights and KV cache) on "
                        "a CUDA device, the fake-quant model elsewhere; on: always (without a GPU they run in "
                        "Triton's interpreter, slowly); off: the fake-quant reference model")
    p.add_argument("--kernel-dtype", choices=("float16", "float32"), default="float16",
                   help="activation dtype of the kernel model (float32 matches the fake-quant model more closely)")
    p.add_argument("--decode-attention", choices=("tc", "cc", "ccs", "mma"), default=None,
                   help="decode attention kernel of the kernel model: tc (tensor cores, the default), cc (CUDA "
                        "cores, float32), ccs (cc with a running max per token slot) or mma (Gluon: the cache "
                        "dequantized into tensor-core operand registers; float16, sm_80+); "
                        "$INFOQUANT_DECODE_KERNEL sets the default")
    p.add_argument("--cuda-graphs", choices=("on", "off"), default=None,
                   help="kernel model on a CUDA device: replay each decode step as a CUDA graph (on, the default; "
                        "$INFOQUANT_CUDA_GRAPHS=0 sets off) or launch its kernels one by one from Python (off)")


def _cuda_graphs(args: argparse.Namespace) -> bool | None:
    return None if args.cuda_graphs is None else args.cuda_graphs == "on"


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
    _add_kernels(p)


def _add_generate(sub: Any, name: str = "generate") -> None:
    p = sub.add_parser(name, help="greedy chat reply from an artifact, an exported .onnx, a TensorRT .plan or a "
                       "FP model" + (" (same as generate)" if name != "generate" else ""))
    p.add_argument("target", nargs="?", help="artifact directory (--backend torch) or .onnx file (--backend ort)")
    p.add_argument("--model", help="full-precision model instead: demo | .gguf | HF directory")
    p.add_argument("--backend", choices=("torch", "ort", "trt"), default=None,
                   help="torch = fake-quant model (default for directories), ort = ONNX Runtime (default for .onnx), "
                   "trt = a TensorRT engine .plan (default for .plan; needs a GPU TensorRT supports)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true")
    _add_device(p)
    _add_kernels(p)


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="export an artifact directory to ONNX (Q/DQ + infoquant custom nodes)")
    p.add_argument("artifact", help="artifact directory written by quantize")
    p.add_argument("--out", required=True, help="output .onnx path (its directory must exist)")
    p.add_argument("--target", choices=("ort", "trt"), default="ort",
                   help="trt also writes NAME.trt.onnx without function bodies, for TensorRT < 10.7")
    ext = p.add_mutually_exclusive_group()
    ext.add_argument("--external-data", dest="external_data", action="store_true", default=None,
                     help="weights in NAME.onnx.data (automatic above 512 MB)")
    ext.add_argument("--no-external-data", dest="external_data", action="store_false")


def _add_verify(sub: Any) -> None:
    p = sub.add_parser("verify", help="parity of ONNX Runtime against the fake-quant model (exit 1 when it fails)")
    p.add_argument("artifact", help="artifact directory the ONNX file was exported from")
    p.add_argument("onnx", help="exported .onnx file")
    p.add_argument("--json", dest="json_path", help="write the full report to this JSON file")
    p.add_argument("--per-layer", action="store_true", help="compare the residual stream after every layer")
    p.add_argument("--plot", help="PNG of per-layer SQNR (implies --per-layer)")
    p.add_argument("--corpus", "--dataset", dest="corpus", default="default")
    p.add_argument("--windows", type=int, default=16, help="number of evaluation windows (16 x 512 = 8192 tokens)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--min-top1", type=float, default=0.995)
    p.add_argument("--max-ppl-rel-diff", type=float, default=0.005)
    p.add_argument("--min-sqnr-db", type=float, default=40.0)
    p.add_argument("--layer-sqnr-db", type=float, default=40.0)
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="check the AutoCast form a TensorRT build with this --precision uses (ONNX Runtime, CPU)")
    p.add_argument("--engine", help="check a TensorRT engine built from the .onnx instead (needs a supported GPU)")


def _add_build(sub: Any) -> None:
    p = sub.add_parser("build", help="TensorRT engine from an exported .onnx with the infoquant plugins "
                       "(also: infoquant-export MODEL.onnx --engine OUT.plan)")
    p.add_argument("onnx", help="exported .onnx (or the .trt.onnx variant)")
    p.add_argument("--engine", required=True, help="output .plan path (its directory must exist); sidecar PLAN.json")
    p.add_argument("--sm", help="TensorRT-RTX ahead-of-time targets, e.g. 86,89 (default 89; RTX only)")
    p.add_argument("--max-batch", type=int, default=1)
    p.add_argument("--max-seq", type=int, default=512, help="most new tokens per call (prefill profile)")
    p.add_argument("--max-context", type=int, default=2048, help="most cached + new tokens (decode profile)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="precision of everything that is not an infoquant plugin (ModelOpt AutoCast for fp16/bf16)")
    p.add_argument("--timing-cache", help="timing cache file (read when present, written after the build)")
    p.add_argument("--trt", choices=("tensorrt", "tensorrt_rtx"), help="force a TensorRT flavour")
    p.add_argument("--json", action="store_true")


def _add_deploy(sub: Any) -> None:
    p = sub.add_parser("triton-repo", help="Triton Inference Server model repository for an exported model")
    p.add_argument("source", help="model.onnx, or a directory holding it (export or pipeline output)")
    p.add_argument("--out", required=True, help="new repository directory (must not exist)")
    p.add_argument("--name", default="infoquant_llm", help="model name in the repository")
    p.add_argument("--instances", type=int, default=1, help="model instances (each its own process and session)")
    p.add_argument("--instance-kind", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--max-batch-size", type=int, default=0)
    p.add_argument("--dynamic-batching", action="store_true", help="needs --max-batch-size >= 1")
    p.add_argument("--engine", choices=("auto", "ort", "trt"), default="auto",
                   help="auto: a TensorRT plan for the GPU when present, else ONNX Runtime")
    p.add_argument("--plan", action="append", default=[], metavar="smXY=PATH",
                   help="TensorRT plan per compute capability (repeatable); also writes a tensorrt_plan model")
    p.add_argument("--max-context", type=int, default=None, help="prompt + reply tokens (default: the tokenizer's)")
    p.add_argument("--default-max-tokens", type=int, default=64)
    p.add_argument("--ort-threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    p.add_argument("--config-extra", help="file with config.pbtxt text appended to the LLM model's config")
    p = sub.add_parser("jetson-bundle", help="offline bundle for a Jetson Orin (sm_87): ONNX, kernels, scripts")
    p.add_argument("source", help="model.onnx, or a directory holding it (export or pipeline output)")
    p.add_argument("--out", required=True, help="new bundle directory (must not exist)")
    p.add_argument("--no-kernels", action="store_true", help="skip compiling the Triton kernels for sm_87")
    p = sub.add_parser("pipeline", help="quantize, eval, export, verify, engine (when TensorRT), Triton repository")
    p.add_argument("--model", default="demo", help="demo | .gguf | Hugging Face model directory")
    p.add_argument("--out", required=True, help="new output directory")
    p.add_argument("--rotation", default="hadamard", choices=("none", "hadamard"))
    p.add_argument("--weights", default="gptq", choices=WEIGHT_METHODS)
    p.add_argument("--eval-windows", type=int, default=80, help="perplexity windows of 512 tokens (default 80)")
    p.add_argument("--verify-windows", type=int, default=16)
    p.add_argument("--engine-sm", default="89", help="comma-separated compute capabilities of the engines")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    _add_device(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="infoquant-export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_quantize(sub)
    _add_eval(sub)
    _add_generate(sub)
    _add_export(sub)
    _add_verify(sub)
    _add_build(sub)
    _add_generate(sub, "run")
    _add_deploy(sub)
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

    preset = PRESET_VALUES[args.preset] if args.preset else {"calibration": {}, "psot": {}, "lac": {}}
    calib = {**preset["calibration"]}
    for name, value in (("num_windows", args.calib_windows), ("seq_len", args.calib_seq_len)):
        if value is not None:
            _positive(f"--calib-{name.replace('num_', '').replace('_', '-')}", value)
            calib[name] = value
    cfg = QuantConfig(
        w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits, weights=args.weights, rotation=args.rotation,
        rotation_blocks=args.rotation_blocks or 1, rotation_seed=args.seed, w_clip_search=not args.no_clip_search,
        a_clip_ratio=args.a_clip_ratio, numerics=args.numerics,
        kv_clip_ratio=args.kv_clip_ratio if args.kv_clip_ratio is not None else PROFILES[args.numerics].k_clip or 0.95,
        calibration=CalibrationConfig(corpus=args.calib_corpus, seed=args.seed, **calib),
        psot=_section(PsotConfig, preset["psot"], args, "psot"),
        lac=_section(LacConfig, preset["lac"], args, "lac", enabled=args.lac),
    ).validate()
    return quantize_to_dir(args.model, cfg, args.out, resolve_device(args.device), import_blocks=args.rotation_blocks)


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from infoquant_export.pipeline import evaluate, load_for_eval, resolve_device

    _positive("--seq-len", args.seq_len)
    target = _target(args)
    model, tokenizer, label = load_for_eval(target, resolve_device(args.device), args.kernels, args.kernel_dtype,
                                          args.decode_attention, _cuda_graphs(args))
    result = evaluate(model, tokenizer, args.corpus, args.seq_len, args.max_windows, args.batch_size)
    return {"model": target, "config": label, **result}


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    from infoquant_export.eval.generate import chat, chat_prompt_ids, timing_summary

    target = _target(args)
    suffix = Path(str(target)).suffix
    backend = args.backend or {".onnx": "ort", ".plan": "trt"}.get(suffix, "torch")
    if backend in ("trt", "ort"):
        from infoquant_export.runtime.ort_decoder import OrtDecoder, ort_greedy_generate

        wanted, what, how = {
            "trt": (".plan", "a TensorRT engine", " (build it with infoquant-export MODEL.onnx --engine out.plan)"),
            "ort": (".onnx", "an exported .onnx file", "")}[backend]
        if args.model or suffix != wanted:
            raise UserError(f"--backend {backend} runs {what}",
                            f"infoquant-export generate model{wanted} --backend {backend} --prompt ...{how}")
        _positive("--max-new-tokens", args.max_new_tokens)
        if backend == "trt":
            from infoquant_export.trt.runtime import TrtDecoder

            decoder: Any = TrtDecoder(target)
        else:
            decoder = OrtDecoder(target)
        tokenizer = decoder.tokenizer()
        ids = chat_prompt_ids(tokenizer, args.prompt).numpy()
        timing: dict[str, Any] = {}
        tokens = ort_greedy_generate(decoder, ids, args.max_new_tokens, decoder.stop_ids(tokenizer), timing)
        return {"backend": backend, "prompt": args.prompt, "tokens": tokens,
                "text": tokenizer.decode(tokens, skip_special_tokens=True), "timing": timing_summary(timing)}
    from infoquant_export.pipeline import load_for_eval, resolve_device

    if str(target).endswith(".onnx"):
        raise UserError(f"{target} is an ONNX file; --backend torch runs an artifact directory",
                        "pass --backend ort, or the artifact directory")
    model, tokenizer, label = load_for_eval(target, resolve_device(args.device), args.kernels, args.kernel_dtype,
                                          args.decode_attention, _cuda_graphs(args))
    return {"backend": "torch", "config": label, **chat(model, tokenizer, args.prompt, args.max_new_tokens)}


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from infoquant_export.export.exporter import export_onnx
    from infoquant_export.pipeline import peak_rss_mb

    result = export_onnx(args.artifact, args.out, target=args.target, external_data=args.external_data)
    return {"onnx": str(result.onnx_path), "trt_onnx": str(result.trt_path) if result.trt_path else None,
            "external_data": result.external_data, "seconds": round(result.seconds, 2),
            "initializer_mb": round(result.initializer_bytes / 2**20, 1), "custom_nodes": result.num_custom_nodes,
            "peak_rss_mb": peak_rss_mb()}


def cmd_verify(args: argparse.Namespace) -> dict[str, Any]:
    from infoquant_export.verify import Thresholds, verify

    _positive("--windows", args.windows)
    _positive("--seq-len", args.seq_len)
    th = Thresholds(top1_agreement=args.min_top1, ppl_rel_diff=args.max_ppl_rel_diff,
                    logits_sqnr_db=args.min_sqnr_db, layer_sqnr_db=args.layer_sqnr_db)
    if args.json_path and not Path(args.json_path).parent.is_dir():
        raise UserError(f"directory of --json {args.json_path} does not exist", "create it first")
    if args.plot and not Path(args.plot).parent.is_dir():
        raise UserError(f"directory of --plot {args.plot} does not exist", "create it first")
    report = verify(args.artifact, args.onnx, args.corpus, args.seq_len, args.windows,
                    per_layer=args.per_layer or bool(args.plot), thresholds=th, plot=args.plot,
                    precision=args.precision, engine=args.engine)
    if args.json_path:
        from infoquant_export.fsutil import atomic_output_file

        with atomic_output_file(args.json_path) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
    return report


def cmd_build(args: argparse.Namespace) -> dict[str, Any]:
    from infoquant_export.trt.build import build_engine

    result = build_engine(args.onnx, args.engine, sm=args.sm, max_batch=args.max_batch, max_seq=args.max_seq,
                          max_context=args.max_context, precision=args.precision, timing_cache=args.timing_cache,
                          flavour=args.trt, allow_reexec=True)
    side = result.sidecar
    return {"engine": str(result.plan_path), "sidecar": str(result.sidecar_path),
            "tensorrt": f"{side['tensorrt']['flavour']} {side['tensorrt']['version']}", "targets": side["targets"],
            "plugin_layers": {p["name"]: p["layers"] for p in side["plugins"]}, "plan_mb": round(side["plan_bytes"]
            / 2**20, 2), "build_seconds": side["build_seconds"], "total_seconds": side["total_seconds"]}


def cmd_triton_repo(args: argparse.Namespace) -> dict[str, Any]:
    from infoquant_export.deploy.triton_repo import RepoOptions, build_repository, parse_plans

    extra = ""
    if args.config_extra:
        if not Path(args.config_extra).is_file():
            raise UserError(f"--config-extra {args.config_extra} does not exist", "pass a file of config.pbtxt text")
        extra = Path(args.config_extra).read_text()
    opts = RepoOptions(name=args.name, instances=args.instances, instance_kind=args.instance_kind,
                       max_batch_size=args.max_batch_size, dynamic_batching=args.dynamic_batching,
                       engine=args.engine, max_context=args.max_context, default_max_tokens=args.default_max_tokens,
                       ort_threads=args.ort_threads, plans=parse_plans(args.plan), config_extra=extra)
    return build_repository(args.source, args.out, opts)


def cmd_jetson_bundle(args: argparse.Namespace) -> dict[str, Any]:
    from infoquant_export.deploy.jetson import build_bundle

    return build_bundle(args.source, args.out, kernels=not args.no_kernels)


def cmd_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    from infoquant_export.deploy.end_to_end import PipelineOptions, run_pipeline
    from infoquant_export.pipeline import resolve_device

    try:
        sms = [int(v) for v in args.engine_sm.split(",") if v.strip()]
    except ValueError as err:
        raise UserError(f"invalid --engine-sm {args.engine_sm!r}", "e.g. --engine-sm 89 or 87,89") from err
    opts = PipelineOptions(model=args.model, rotation=args.rotation, weights=args.weights,
                           device=resolve_device(args.device), eval_windows=args.eval_windows,
                           verify_windows=args.verify_windows, engine_sm=sms)
    return run_pipeline(args.out, opts)


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "generate": cmd_generate, "export": cmd_export,
            "verify": cmd_verify, "build": cmd_build, "run": cmd_generate, "triton-repo": cmd_triton_repo,
            "jetson-bundle": cmd_jetson_bundle, "pipeline": cmd_pipeline}


def _engine_form(argv: list[str]) -> list[str]:
    """``MODEL.onnx --engine OUT.plan ...`` -> ``build MODEL.onnx --engine OUT.plan ...``."""
    if argv and argv[0].endswith(".onnx") and any(a == "--engine" or a.startswith("--engine=") for a in argv):
        return ["build", *argv]
    return argv


def _report(command: str, result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    elif command in ("generate", "run"):
        print(result["text"])
        if "timing" in result:  # on stderr: stdout stays the reply
            t = result["timing"]
            decode = (f", decode {t['decode_tokens_per_s']} tokens/s ({t['decode_step_ms']} ms per token)"
                      if "decode_step_ms" in t else "")
            print(f"[{result.get('config', result.get('backend', ''))}: prefill {t['prefill_tokens']} tokens in "
                  f"{t['prefill_ms']} ms{decode}]", file=sys.stderr)
    elif command == "verify":
        verdict = "PASSED" if result["passed"] else "FAILED"
        where = (f"; first divergent layer {result['first_divergent_layer']}"
                 if result.get("first_divergent_layer") is not None else "")
        print(f"verify {verdict}: top-1 agreement {result['top1_agreement']:.4%}, ppl {result['ppl_reference']:.4f} "
              f"(torch) vs {result['ppl_backend']:.4f} ({result['backend']}), "
              f"logits SQNR {result['logits_sqnr_db']} dB, "
              f"KL {result['kl_divergence']:.3g} over {result['tokens']} tokens{where}")
    elif command == "pipeline":
        from infoquant_export.deploy.end_to_end import format_summary

        print(format_summary(result))
    elif command == "eval":
        print(f"{result['config']}: ppl {result['ppl']:.3f} on {result['corpus']} "
              f"({result['windows']} windows x {result['seq_len']} tokens)")
    else:
        print(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_engine_form(list(sys.argv[1:] if argv is None else argv)))
    try:
        result = COMMANDS[args.command](args)
    except UserError as err:
        print(f"infoquant-export: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("infoquant-export: interrupted; no partial output was left", file=sys.stderr)
        return 130
    _report(args.command, result, getattr(args, "json", False))
    return 1 if args.command == "verify" and not result["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
