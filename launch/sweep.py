"""Search hyperparameters with Ray Tune: `launch/sweep.py --config configs/sweeps/NAME.yaml [key=value ...]`.

Each trial is a Ray Train TorchTrainer running the same trainer as launch/train.py on
`resources.workers` workers (DeepSpeed over gloo on CPU, nccl on GPU). Without RAY_ADDRESS a local Ray
starts on this machine; with it, the driver joins that cluster (run it on a cluster node: `storage` must
be a filesystem every node mounts, since the trainers write their checkpoints there):
    python launch/sweep.py --config configs/sweeps/tiny.yaml fixed.data.path=data/digits
    RAY_ADDRESS=auto python launch/sweep.py --config configs/sweeps/cifar10.yaml storage=/shared/sweeps
Running the same command again after the driver died resumes the sweep (finished trials are kept).
Results: storage/name/trials.csv and storage/name/best.yaml, which `launch/train.py --config` trains.
Exit codes: 0 done, 1 no trial reported a result, 2 bad sweep config or a trial's data missing or unfit (checked
before Ray starts, as launch/train.py checks it).
"""
import sys

from nvp_dist.sweep.entry import main

if __name__ == "__main__":
    sys.exit(main())
