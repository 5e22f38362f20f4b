"""release_memory gives freed heap back to the system, so a long experiment chain does not grow."""

import subprocess
import sys

from apexdsp.memory import release_memory, resident_megabytes

PROGRAM = """
from apexdsp.memory import release_memory, resident_megabytes
start = resident_megabytes()
rows = [bytearray(2000) for _ in range(300_000)]  # about 600 MB of small heap blocks
peak = resident_megabytes()
survivors = rows[::50]  # a few live blocks spread over the heap: glibc cannot shrink it from the top
del rows
kept = resident_megabytes()
release_memory()
print(start, peak, kept, resident_megabytes())
"""


def test_freed_heap_goes_back_to_the_system():
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True)
    start, peak, kept, released = map(int, out.stdout.split())
    assert peak - start > 500
    assert kept > start + 0.75 * (peak - start)  # freed, but still held by the process
    assert released < start + 0.25 * (peak - start), (start, peak, kept, released)


def test_release_memory_is_safe_to_call_and_rss_is_known_on_linux():
    release_memory()
    assert resident_megabytes() > 0
