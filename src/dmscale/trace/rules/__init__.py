"""Built-in op rules, one module per op family; importing this package registers them all.

Each rule's docstring states what it couples and what it fixes; ``tests/trace/test_<family>.py``
checks it.
"""

from . import (attention, conv, creation, einsum, elementwise, embedding, index, linear, matmul, metadata,  # noqa: F401
               mha, norm, normalize, pool, reduce, rnn, shape)
