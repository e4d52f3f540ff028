"""``onnxforge run / verify-package / demo``: run a recipe, verify a package, run the demo."""

from __future__ import annotations

import dataclasses

from onnxforge.commands._args import add_io_flags
from onnxforge.common import jsonio
from onnxforge.common.errors import EXIT_BUDGET


def register(sub) -> None:
    run = sub.add_parser("run", help="run a recipe: export, optimize, candidates, benchmark, select, package")
    run.add_argument("recipe", nargs="+", help="the recipe TOML file; several make a sweep, each into OUT/<recipe name>/")
    run.add_argument("--out", default="out", help="output folder (default out)")
    run.add_argument("--ray", nargs="?", const="auto", metavar="auto|local|HOST:PORT",
                     help="run the recipes' steps as Ray tasks: on the cluster this machine joined (auto, the default), "
                          "a Ray started here (local), or the cluster at HOST:PORT; needs onnxforge[ray]")
    run.add_argument("--step-cpus", type=float, default=1.0, help="with --ray: CPUs each step declares")
    run.add_argument("--step-memory-gb", type=float, default=2.0, help="with --ray: memory each step declares, in GB")
    run.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a recipe value (repeatable)")
    run.add_argument("--force", action="store_true", help="rerun every step even if unchanged")
    add_io_flags(run)
    run.set_defaults(func=_run_command)

    verify = sub.add_parser("verify-package", help="check a deployment package's checksums and run a smoke inference")
    verify.add_argument("package", help="the package folder")
    add_io_flags(verify)
    verify.set_defaults(func=_verify_package_command)

    demo = sub.add_parser("demo", help="run the built-in demo (the pipeline on the digits CNN, all-MiniLM-L6-v2 and a small decoder)")
    demo.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    demo.add_argument("--no-minilm", action="store_true", help="skip the all-MiniLM-L6-v2 part")
    demo.add_argument("--no-decoder", action="store_true", help="skip the generative decoder part (examples/docstring_llama.toml)")
    demo.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a recipe value")
    demo.set_defaults(func=_demo_command)


def _run_command(args) -> int:
    if len(args.recipe) > 1 or args.ray:
        return _sweep_command(args)
    from onnxforge.pipeline import run_pipeline
    from onnxforge.recipe import load_recipe
    from onnxforge.sweep import note_unenforced_targets

    recipe = load_recipe(args.recipe[0], args.set)
    note_unenforced_targets([recipe])
    result = run_pipeline(recipe, args.out, force=args.force)
    if args.json:
        print(jsonio.document({"selected": result.selected, "package": str(result.package) if result.package else None,
                               "candidates": [r.__dict__ for r in result.rows],
                               "steps": [{"name": s.name, "cached": s.cached, "seconds": s.seconds} for s in result.steps]}))
        return 0
    for step in result.steps:
        print(f"  {step.name:<28} {'reused (unchanged)' if step.cached else f'ran in {step.seconds:.1f} s'}")
    print(result.table())
    print(f"package: {result.package}" if result.package else "no candidate met the fidelity budget: nothing packaged")
    if (result.out / "report.html").is_file():
        print(f"report: {result.out / 'report.html'}")  # the last line: where to look
    return 0 if result.package or result.selected else EXIT_BUDGET


def _sweep_command(args) -> int:
    from onnxforge.sweep import RaySettings, run_sweep

    settings = None
    if args.ray:
        settings = RaySettings(address=args.ray, step_cpus=args.step_cpus, step_memory_gb=args.step_memory_gb,
                               worker_logs=bool(args.verbose))
    result = run_sweep(args.recipe, args.out, overrides=args.set, force=args.force, ray=settings)
    if args.json:
        print(jsonio.document({"recipes": [o.summary() for o in result.outcomes], "ray": result.cluster}))
        return result.exit_code()
    print(result.table())
    print(f"sweep: {result.out / 'sweep.json'}, {result.out / 'sweep.html'}")
    return result.exit_code()


def _verify_package_command(args) -> int:
    from onnxforge.package import verify_package

    check = verify_package(args.package)
    if args.json:
        print(jsonio.document({"package": str(args.package), **dataclasses.asdict(check)}))
        return 0
    agreement = "equal to" if check.max_error == 0 else f"within {check.max_error:.2g} of"
    print(f"{args.package}: {check.files_checked} files match their checksums; smoke inference {agreement} "
          "the reference outputs"
          + (f"; greedy generation replayed {check.generated_tokens} recorded tokens" if check.generated_tokens else ""))
    return 0


def _demo_command(args) -> int:
    from onnxforge.demo import format_demo, run_demo

    results = run_demo(args.out, include_minilm=not args.no_minilm, include_decoder=not args.no_decoder, overrides=args.set)
    print(format_demo(results))
    return 0
