"""How many threads torch gets on the thread that steps an engine, by the runtime the engine drives.

A torch model wants every core. Beside an ONNX Runtime session, torch only samples one logits row per
sequence, and a second pool of spinning OpenMP threads fights ORT's for the cores (int4 batch-1 decode
65 -> 122 tok/s here when torch keeps one thread). Torch's count is per OS thread (OpenMP's nthreads
setting; a thread that never set it starts from the last count set anywhere), so each engine thread
sets its own and one process can step both kinds, as a server with an fp32 model and an int4 artifact does.
"""

from __future__ import annotations

import torch

from kiln import settings

# the count this process was started with (KILN_THREADS, else torch's default: the cores it may use),
# read at import, before any runtime has narrowed a thread's count
PROCESS_THREADS = settings.threads() or torch.get_num_threads()


def torch_threads_for(model: object | None) -> int:
    """Threads torch should use on the thread that steps `model` (a runtime may ask for fewer); all of the
    process's for None (loading a model)."""
    wanted = getattr(model, "torch_threads", None)
    return int(wanted) if wanted else PROCESS_THREADS


def use_threads_for(model: object | None) -> None:
    """Set the calling thread's torch thread count for stepping `model` (None: all of the process's)."""
    # torch initializes a thread's count lazily, at its first parallel op or count query, to the last count
    # set anywhere; a count set before that is overwritten, so let the initialization happen first
    torch.get_num_threads()
    torch.set_num_threads(torch_threads_for(model))
