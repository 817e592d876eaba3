"""One page pool per model: every layer and sequence draws its KV memory from it, so a budget
moved from one layer (or KV head) to another moves memory.

    k, v    [P, S, D]  keys / values (the model's dtype); one page = S slots of one KV head
    pos     int32 [P, S] the position each slot holds (-1: empty)
    score   fp32 [P, S]  H2O's accumulated attention mass per slot

The free list lives on the host: pages are handed out and taken back between decode steps
(admission and retirement), never during one, so a decode step needs no allocator and stays
capturable in a CUDA graph. A pool that cannot serve a request raises PoolExhausted before
anything is handed out; it never hands out a live page.
"""
import torch


class PoolExhausted(RuntimeError):
    """The pool has fewer free pages than a request needs (the caller may queue it and retry
    once sequences retire)."""


class PagePool:
    """K/V, position and score pages with a host-side free list.

    Args:
        num_pages: P. page_size: S, slots per page. head_dim: D. dtype: of K and V.
        device: where the pages live.
    """

    def __init__(self, num_pages, page_size, head_dim, dtype, device):
        if num_pages < 0 or page_size < 1 or head_dim < 1:
            raise ValueError(f"pool: expected num_pages >= 0, page_size >= 1 and head_dim >= 1, got {num_pages}, "
                             f"{page_size} and {head_dim}")
        self.page_size = page_size
        self.k = torch.empty(num_pages, page_size, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.pos = torch.full((num_pages, page_size), -1, dtype=torch.int32, device=device)
        self.score = torch.zeros(num_pages, page_size, dtype=torch.float32, device=device)
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: the lowest ids go first

    @property
    def num_pages(self):
        return self.k.shape[0]

    @property
    def free_pages(self):
        return len(self._free)

    @property
    def tensors(self):
        """(k, v, pos, score): the pool arguments of the ops."""
        return self.k, self.v, self.pos, self.score

    def pages_for(self, slots):
        """Pages that hold `slots` slots of one row."""
        return -(-slots // self.page_size)

    def allocate(self, count):
        """`count` free pages (a list of ids); raises PoolExhausted, handing out none, when fewer are free."""
        if count > len(self._free):
            raise PoolExhausted(f"pool: {count} pages needed, {len(self._free)} of {self.num_pages} free")
        taken = self._free[len(self._free) - count:][::-1]
        del self._free[len(self._free) - count:]
        return taken

    def grow(self, count):
        """`count` more pages, free (a host-side reallocation of the pool's tensors, the pages held
        keep their ids and contents; whatever captured the old tensors, a CUDA graph, must be
        made again). For a pool owned by one cache (models.hf.SqueezeCache); an engine sizes
        its pool once."""
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"count: expected an int >= 0, got {count!r}")
        P = self.num_pages
        self.k = torch.cat([self.k, self.k.new_empty(count, *self.k.shape[1:])])
        self.v = torch.cat([self.v, self.v.new_empty(count, *self.v.shape[1:])])
        self.pos = torch.cat([self.pos, self.pos.new_full((count, self.page_size), -1)])
        self.score = torch.cat([self.score, self.score.new_zeros(count, self.page_size)])
        self._free[:0] = range(P + count - 1, P - 1, -1)  # below the stack: the lowest ids still go first

    def release(self, pages):
        """Pages back to the free list (their slots are cleared: position -1, score 0)."""
        if pages:
            ids = torch.tensor(pages, dtype=torch.long, device=self.pos.device)
            self.pos[ids] = -1
            self.score[ids] = 0.0
            self._free.extend(sorted(pages, reverse=True))

    def page_bytes(self):
        """Bytes of one page: its K and V slots and their positions and scores."""
        S, D = self.k.shape[1:]
        return S * (2 * D * self.k.element_size() + 4 + 4)

    def kv_bytes(self, pages):
        """K + V bytes of `pages` pages."""
        return pages * 2 * self.k.shape[1] * self.k.shape[2] * self.k.element_size()
