"""The compiling half of test_sm90_compile, run in a process without Triton's interpreter (whose
patches of triton.language would break the compiler): reads the recorded launches as JSON on stdin,
compiles each kernel for an H100 (sm_90) and prints [[kernel, shared memory bytes or the error], ...] in
the launches' order."""
import json
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import nlc


def _constant(value):
    return tl.dtype(value["dtype"]) if isinstance(value, dict) else value


def main():
    job = json.load(sys.stdin)
    program = nlc.compile(job["spec"], **job["params"])
    out = []
    for k in job["kernels"]:
        kernel = getattr(program.module(k["module"].rsplit(".", 1)[-1]), k["name"])
        while not isinstance(kernel, triton.runtime.jit.JITFunction):  # under autotune / heuristics
            kernel = kernel.fn
        constants = {n: _constant(v) for n, v in k["constants"].items()}
        try:
            compiled = triton.compile(ASTSource(kernel, k["signature"], constants),
                                      target=GPUTarget("cuda", 90, 32), options=k["options"])
            out.append([k["name"], compiled.metadata.shared])
        except Exception as error:  # noqa: BLE001 - reported by the test, with the kernel's name
            out.append([k["name"], f"{type(error).__name__}: {error}"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
