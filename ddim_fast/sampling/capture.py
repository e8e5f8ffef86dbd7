"""What running the captured loop needs around it: the emulation's preconditions, and for a
real capture, host syncs found before it and the process's state restored after one fails."""

from __future__ import annotations

import contextlib
import warnings

import torch

EMULATE = "emulate"  # FastSampler(cuda_graph=EMULATE): the captured loop's code, not captured


def check_emulation(x: torch.Tensor, *, return_x0: bool, return_trajectory: bool, check_finite: bool) -> None:
    """Why cuda_graph="emulate" cannot run on x, raised: the loop returns the final sample
    only, and its Triton kernels need a CUDA device or, on the CPU, Triton's interpreter."""
    asked = [name for name, on in (("return_x0", return_x0), ("return_trajectory", return_trajectory), ("check_finite", check_finite)) if on]
    if asked:
        raise ValueError(f"cuda_graph={EMULATE!r} runs the captured loop, which returns only the final sample: {', '.join(asked)} need cuda_graph=False")
    if x.device.type == "cuda":
        return
    try:
        from triton.runtime.interpreter import InterpretedFunction

        from ..kernels import ddim_step as k
    except ImportError as e:
        raise RuntimeError(f"cuda_graph={EMULATE!r} runs the captured loop's Triton kernels, and Triton is not available ({e})") from e
    if not isinstance(k._ddim_step_kernel, InterpretedFunction):
        raise RuntimeError(
            f"cuda_graph={EMULATE!r} on {x.device} runs the captured loop's Triton kernels under Triton's interpreter: "
            "set TRITON_INTERPRET=1 in the environment before ddim_fast's kernels are imported"
        )


@contextlib.contextmanager
def host_syncs_reported():
    """Within: every CUDA host sync is recorded, not raised (torch's sync debug mode "warn");
    yields the list of their messages. Other warnings pass on as they came."""
    previous = torch.cuda.get_sync_debug_mode()
    syncs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield syncs
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for w in caught:
        message = str(w.message)
        if "synchronizing CUDA operation" in message:
            syncs.append(message.splitlines()[0])
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def restore_after_failed_capture(device: torch.device, pool, generators) -> None:
    """Undo what a failed capture leaves behind, so that the eager fallback and later
    captures work.

    In torch <= 2.12, when a capture is invalidated (an uncapturable call inside it),
    CUDAGraph::capture_end throws before it ends the allocator's routing of allocations to
    the graph's pool and before the generators registered with the graph (ours and the
    device's default one) leave capture mode: the next torch.randn on such a generator
    raises "Attempt to increase offset for a CUDA generator not in capture mode", and every
    later capture fails in torch.cuda.graph's empty_cache. So: end the routing if it is still
    on, then capture one trivial graph with the same generators, whose successful end takes
    them out of capture mode. Both are no-ops where torch cleaned up after itself."""
    torch.cuda.synchronize(device)
    end_routing = getattr(torch._C, "_cuda_endAllocateToPool", None) or getattr(torch._C, "_cuda_endAllocateCurrentStreamToPool", None)
    if end_routing is not None:
        try:
            end_routing(device.index, pool)
        except RuntimeError:
            pass  # nothing is routed to the pool any more: capture_end got that far
    graph = torch.cuda.CUDAGraph()
    for generator in generators:
        graph.register_generator_state(generator)
    scratch = torch.zeros(1, device=device)
    with torch.cuda.graph(graph):
        scratch.add_(1)
    torch.cuda.synchronize(device)
