"""The threads of the load format's expert blocks (the loading thread and
its readers) still alive in this process."""

import threading

from vllm_w4a8_fastprep.expert_blocks import THREAD_PREFIX


def block_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]
