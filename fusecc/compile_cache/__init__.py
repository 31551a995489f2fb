"""fusecc's persistent compile cache (see location.py for what lives where):

- graph_cache.py: the backend stores each compiled graph; a later process skips AOTAutograd,
  passes and code generation for it (Dynamo still traces the Python code);
- function_cache.py: `aot_compile(fn, args)` stores a whole function through torch's AOT compile;
  a later process traces nothing.

`fusecc cache list|clear` shows and removes entries.
"""

from fusecc.compile_cache.function_cache import aot_compile
from fusecc.compile_cache.location import cache_root
from fusecc.compile_cache.stats import counters

__all__ = ["aot_compile", "cache_root", "counters"]
