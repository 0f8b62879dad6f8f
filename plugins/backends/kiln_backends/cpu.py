"""The CPU backend: LLVM for the host processor, with kiln's CPU schedule rules."""

from __future__ import annotations

from kiln.specs import BackendOption, BackendSpec


def host_target(opts) -> dict:
    """The host CPU as a TVM target dict (``mcpu`` read off the machine unless given)."""
    import tvm

    if opts.get("mcpu"):
        return {"kind": "llvm", "mcpu": opts["mcpu"]}
    target = tvm.target.Target.from_device(tvm.cpu())
    return dict(target.export())


def pipeline(target, opts):
    import tvm
    from tvm import relax

    from .cpu_interleaved import interleave_pass, interleave_rows
    from .cpu_kernels import byte_dots, cast_before_reshape, replace_kernels, replace_projections
    from .cpu_schedules import schedule_pass, serial_twins_pass

    scheduled = bool(opts.get("schedule", 1))
    activations = opts.get("activations", "int16")

    @tvm.transform.module_pass(opt_level=0, name="KilnCPUPipeline")
    def _pipeline(mod, _ctx):
        passes = [replace_kernels(target), cast_before_reshape()] if scheduled else []
        passes += [
            relax.backend.DispatchSampling(),
            relax.backend.DispatchSortScan(),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination(),
        ]
        rows = interleave_rows(target) if scheduled and int(opts.get("interleave", 1)) else 0
        if rows:
            passes += [interleave_pass(rows, vnni=byte_dots(target), int8=activations == "int8")]
        if scheduled:
            passes += [replace_projections(target, int8=activations == "int8"), schedule_pass(target)]
        passes += [relax.transform.RewriteDataflowReshape()]
        if scheduled:
            passes += [serial_twins_pass()]
        passes += [
            relax.transform.ToNonDataflow(),
            relax.transform.RemovePurityChecking(),
            relax.transform.CallTIRRewrite(),
            relax.transform.StaticPlanBlockMemory(),
            relax.transform.LowerAllocTensor(),
            relax.transform.KillAfterLastUse(),
            relax.transform.LowerRuntimeBuiltin(),
            relax.transform.ComputePrimValue(),
            relax.transform.VMShapeLower(),
            relax.transform.AttachGlobalSymbol(),
        ]
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


CPU = BackendSpec(
    name="cpu",
    device_type="cpu",
    target=host_target,
    pipeline=pipeline,
    is_available=lambda: True,
    lib_suffix=".so",
    aliases=("llvm",),
    priority=0,
    options={
        "mcpu": BackendOption("", "LLVM CPU name to compile for (default: this machine's, e.g. skylake-avx512)"),
        "schedule": BackendOption(1, "1: kiln's CPU schedules (threads, vectorized kernels); 0: unscheduled TIR"),
        "interleave": BackendOption(1, "1: projection weights interleaved 16 (AVX-512) or 8 (AVX2) rows to a vector when loaded, for kernels "
                                    "that are faster at every batch size (CPUs with AVX2 or AVX-512); "
                                    "0: row-major weights and kernels", choices=(0, 1)),
        "activations": BackendOption("int16", "what 4- and 8-bit projections round their activations to, per group "
                                     "of 32: int16, or int8 as llama.cpp does (faster with VNNI; logits move "
                                     "about as far from float32 as llama.cpp's)", choices=("int16", "int8")),
    },
    description="this machine's processor via LLVM",
)
