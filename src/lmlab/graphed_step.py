"""A training step's forward and backward, captured once as a CUDA graph and replayed every step.

A small model's step on a GPU is bound by the host, not the device: Python, the autograd engine
and a hundred kernel launches take longer than the kernels (a 2 x 650 LSTM at batch 20 x 35 runs
its kernels in a fraction of the 6 ms its eager step takes). A replayed graph launches the whole
forward and backward in one call. Only the gradients come from the graph: the optimizer, gradient
clipping, the learning-rate schedule and every callback stay eager and unchanged, so any optimizer
and schedule work as they do without it, with the same kernels in the same order.

The first `warmup_steps` steps run eagerly on a side stream (what capture needs: cuDNN, cuBLAS and
torch.compile set themselves up there); they are real training steps. A batch whose shapes differ
from the captured ones (a short last batch) runs eagerly too, writing the same gradient tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

# (x, y, state) -> (loss to differentiate, cross-entropy, auxiliary loss or None, new state)
StepFunction = Callable[[Tensor, Tensor, object], tuple[Tensor, Tensor, Tensor | None, object]]


class GraphCaptureError(RuntimeError):
    """The step did something a CUDA graph cannot hold (a host sync such as `.item()`, a CPU tensor)."""


def state_tensors(state) -> list[Tensor] | None:
    """The tensors of a state a graph can carry (None, a Tensor or a tuple of Tensors), else None."""
    if state is None:
        return []
    if isinstance(state, Tensor):
        return [state]
    if isinstance(state, tuple) and all(isinstance(t, Tensor) for t in state):
        return list(state)
    return None


@contextlib.contextmanager
def capturing(graph: torch.cuda.CUDAGraph, device: torch.device) -> Iterator[None]:
    """`torch.cuda.graph(graph)`, and if the capture breaks off, the device's CUDA generator put back
    as it was: torch leaves it in capture mode, and every later random draw (dropout in the eager
    steps that follow, sampling) would fail."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    generator = torch.cuda.default_generators[index]
    before_capture = generator.clone_state()
    try:
        with torch.cuda.graph(graph):
            yield
    except BaseException:
        generator.graphsafe_set_state(before_capture)
        raise


def _like(template, tensors: list[Tensor]):
    """`tensors` in the shape of `template`'s state (None, Tensor or tuple)."""
    if template is None:
        return None
    return tensors[0] if isinstance(template, Tensor) else tuple(tensors)


class GraphedTrainingStep:
    """Computes a step's loss and fills `.grad` of `parameters`, from a CUDA graph once captured.

    Carried recurrent state lives in the graph's own input buffers: the graph copies its new state
    into them, so the next replay continues from it (truncated BPTT) without a copy on the host.
    Call with the state to start from; passing back the state this returned costs nothing.
    """

    def __init__(self, step: StepFunction, parameters: list[torch.nn.Parameter], warmup_steps: int = 3) -> None:
        self.step = step
        self.parameters = [p for p in parameters if p.requires_grad]
        self.warmup_steps = warmup_steps
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._inputs: list[Tensor] = []  # x, y, then the state's tensors
        self._state = None  # the graph's carried state (its input buffers)
        self._loss: Tensor | None = None
        self._aux: Tensor | None = None
        self._grads: list[Tensor | None] = []

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, x: Tensor, y: Tensor, state=None) -> tuple[Tensor, Tensor | None, object]:
        """(cross-entropy, auxiliary loss or None, new state), with the gradients in `.grad`."""
        self.calls += 1
        inputs = [x, y, *state_tensors(state)]
        if self.graph is None and self.calls <= self.warmup_steps:
            return self._eager_on_side_stream(x, y, state)
        if self.graph is None:
            self._capture(x, y, state)
        elif [t.shape for t in inputs] != [t.shape for t in self._inputs]:
            return self._eager_into_graph_grads(x, y, state)
        for static, value in zip(self._inputs, inputs):
            if static is not value:
                static.copy_(value)
        self._bind_gradients()
        self.graph.replay()
        aux = None if self._aux is None else self._aux.clone()
        return self._loss.clone(), aux, self._state  # clones: the next replay overwrites the outputs

    def _bind_gradients(self) -> None:
        """Point `.grad` back at the tensors the graph writes: anything may have released them since
        (Lightning sets them to None before every validation), and the optimizer reads `.grad`."""
        for p, grad in zip(self.parameters, self._grads):
            if p.grad is not grad:
                p.grad = grad

    def _eager(self, x: Tensor, y: Tensor, state) -> tuple[Tensor, Tensor, Tensor | None, object]:
        for p in self.parameters:
            p.grad = None
        total, loss, aux, state = self.step(x, y, state)
        total.backward()
        return total, loss, aux, _detached(state)

    def _eager_on_side_stream(self, x: Tensor, y: Tensor, state):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _, loss, aux, state = self._eager(x, y, state)
        torch.cuda.current_stream().wait_stream(side)
        return loss.detach(), None if aux is None else aux.detach(), state

    def _eager_into_graph_grads(self, x: Tensor, y: Tensor, state):
        """An eager step that leaves its gradients in the tensors the graph writes (and the optimizer holds)."""
        self._bind_gradients()
        total, loss, aux, state = self.step(x, y, state)
        grads = torch.autograd.grad(total, self.parameters, allow_unused=True)
        for static, grad in zip(self._grads, grads):
            if static is None:
                continue
            if grad is None:
                static.zero_()
            else:
                static.copy_(grad)
        return loss.detach(), None if aux is None else aux.detach(), _detached(state)

    def _capture(self, x: Tensor, y: Tensor, state) -> None:
        self._inputs = [t.clone() for t in (x, y, *state_tensors(state))]
        static_x, static_y, *carried = self._inputs
        self._state = _like(state, carried)
        for p in self.parameters:
            p.grad = None  # backward allocates them from the graph's memory pool, and replays write them
        graph = torch.cuda.CUDAGraph()
        try:
            with capturing(graph, static_x.device):
                total, loss, aux, new_state = self.step(static_x, static_y, self._state)
                total.backward()
                for buffer, value in zip(carried, state_tensors(new_state) or []):
                    buffer.copy_(value.detach())
        except RuntimeError as err:
            for p in self.parameters:
                p.grad = None
            raise GraphCaptureError(str(err).strip().splitlines()[0]) from err
        self.graph, self._loss, self._aux = graph, loss.detach(), None if aux is None else aux.detach()
        self._grads = [p.grad for p in self.parameters]


def _detached(state):
    tensors = state_tensors(state)
    return state if not tensors else _like(state, [t.detach() for t in tensors])
