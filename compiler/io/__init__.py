"""Every file editc writes goes through here: the data-safety invariants, enforced in one place.

1. An output never equals, contains or lies inside an input (``check_output_path``: exit 2).
2. A file a user may edit never shares an inode with an input (``link_or_copy``: reflink where
   the filesystem can, a hard link only for large immutable weight files, a copy otherwise).
3. One writer per output path (``claim_output`` holds a lock beside it; a second is refused).
4. An existing output is replaced only with ``force``, and the replace always leaves the old or
   the new output in place (``renameat2(RENAME_EXCHANGE)``, or a recoverable move-aside);
   temporaries of dead processes are cleaned (or the old output restored) on the next claim.
5. A disk-full, size-limit or permission error exits 2 with one line and leaves nothing behind.
6. The output location is checked before any model is loaded.
"""

from compiler.io.atomic import (OutputClaim, atomic_output_dir, atomic_output_file, claim_output,
                                write_atomically)
from compiler.io.links import link_or_copy
from compiler.io.paths import check_output_path, input_paths, resolve_recipe_output

__all__ = ["OutputClaim", "atomic_output_dir", "atomic_output_file", "check_output_path", "claim_output",
           "input_paths", "link_or_copy", "resolve_recipe_output", "write_atomically"]
