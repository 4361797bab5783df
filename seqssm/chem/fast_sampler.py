"""CUDA-graph sampler: the reference sampling loop, captured ``chunk`` steps at a time.

Every kernel of ``chunk`` consecutive recurrent steps (the model's ``step()`` with its fused S4
state update, filtering, Gumbel-max pick, bookkeeping) is recorded once into a CUDA graph per
chunk position and then replayed for every batch: no per-step launches and no host
synchronisation inside a chunk. The uniform noise of a chunk is drawn from the batch's generator
into a static buffer before each replay, in the same order as the reference loop draws it, so
both samplers give the same molecules from the same seed up to floating-point rounding (the
graph runs the matmuls in bf16 when ``bf16`` is set). After each chunk the host checks once
whether the whole batch has ended.
"""

from __future__ import annotations

import contextlib

import torch

from seqssm.chem.sampling import SampleBatch, _advance


class FastSampler:
    name = "recurrent step, CUDA graphs"

    def __init__(self, model, batch_size: int, *, device, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, chunk: int = 8, bf16: bool = True, half_state: bool = False):
        self.model = model.eval()
        self.cfg = model.cfg
        self.B = int(batch_size)
        self.device = torch.device(device)
        self.kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=self.cfg.eos_id,
                       pad_id=self.cfg.pad_id,
                       bos_id=self.cfg.bos_id)
        self.chunk = int(chunk)
        self.T = self.cfg.max_len - 1
        self.bf16 = bf16
        self.graphs: list[torch.cuda.CUDAGraph] | None = None
        self.half_state = half_state
        if bf16:
            self.name += ", bf16 matmuls"
        if half_state:
            self.name += ", float16 SSM states"

    # static buffers, allocated once
    def _alloc(self) -> None:
        B, V, dev = self.B, self.cfg.vocab_size, self.device
        self.model.setup_step()
        self.state = self.model.default_state(B, device=dev)
        if self.half_state:  # float16 real/imaginary pairs: half the bytes the step moves
            self.state = [torch.view_as_real(s).to(torch.float16).contiguous() for s in self.state]
        self.tok = torch.full((B,), self.cfg.bos_id, dtype=torch.long, device=dev)
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.ll = torch.zeros(B, dtype=torch.float64, device=dev)
        self.out = torch.full((B, self.T), self.cfg.pad_id, dtype=torch.long, device=dev)
        self.noise = torch.zeros(self.chunk, B, V, dtype=torch.float32, device=dev)

    def _reset(self) -> None:
        self.tok.fill_(self.cfg.bos_id)
        self.done.zero_()
        self.ll.zero_()
        self.out.fill_(self.cfg.pad_id)
        for s in _tensors(self.state):
            s.zero_()

    def _autocast(self):
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _steps(self, t0: int) -> None:
        """The work of one chunk (what gets captured)."""
        with self._autocast():
            for j in range(self.chunk):
                t = t0 + j
                if t >= self.T:
                    break
                logits, new_state = self.model.step(self.tok, self.state)
                _copy_state(self.state, new_state)
                nxt, lp, done = _advance(logits.float(), self.done, self.noise[j], **self.kw)
                self.out[:, t].copy_(nxt)
                self.tok.copy_(nxt)
                self.ll.add_(lp.double())
                self.done.copy_(done)

    @torch.no_grad()
    def _capture(self) -> None:
        self._alloc()
        starts = list(range(0, self.T, self.chunk))
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside capture (cuBLAS handles, Triton compilation)
            for t0 in starts[:1]:
                self._steps(t0)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graphs = []
        pool = None
        for t0 in starts:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self._steps(t0)
            pool = g.pool()
            self.graphs.append(g)
        torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def __call__(self, generator: torch.Generator) -> SampleBatch:
        if self.graphs is None:
            self._capture()
        self._reset()
        V = self.cfg.vocab_size
        steps = 0
        for c, g in enumerate(self.graphs):
            n = min(self.chunk, self.T - c * self.chunk)
            # the same draw as the reference loop makes at the start of this chunk
            self.noise[:n].copy_(torch.rand(n, self.B, V, generator=generator, device=self.device))
            g.replay()
            steps += n
            if bool(self.done.all()):
                break
        return SampleBatch(self.out[:, :steps].cpu(), self.ll.cpu(), self.done.cpu(), steps)


def _tensors(state):
    if isinstance(state, torch.Tensor):
        return [state]
    out = []
    for s in state:
        out.extend(_tensors(s))
    return out


def _copy_state(dst, src) -> None:
    """Write a step's new state into the static buffers (a no-op where the step worked in place)."""
    for d, s in zip(_tensors(dst), _tensors(src)):
        if d.data_ptr() != s.data_ptr():
            d.copy_(s)
