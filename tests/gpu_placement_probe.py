"""Run by tests/test_gpu_placement.py in its own process: a Ray instance with two fake GPUs on this
CPU machine, actors placed the way the processing stage places them; prints what each actor sees."""
import json
import os

import ray

from deepfield.tasks.actor_pool import actor_plan
from deepfield.tasks.tile_runner import device_for

if __name__ == "__main__":
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    n, opts = actor_plan(ray.cluster_resources(), use_gpus=True, num_actors=None)

    @ray.remote
    class Probe:
        def look(self):
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            # the device a stage would pick if CUDA were present (this machine has none)
            return dict(pid=os.getpid(), visible=visible, ray_gpu_ids=ray.get_gpu_ids(),
                        device=device_for(visible, cuda_available=True))

    actors = [Probe.options(**opts).remote() for _ in range(n)]
    print(json.dumps(dict(n=n, opts=opts, seen=ray.get([a.look.remote() for a in actors]))))
