"""Train Real NVP with DeepSpeed: `launch/train.py --config configs/X.yaml [key=value ...] [--resume auto]`.

CPU, 2 ranks on gloo (what CI runs):
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 launch/train.py --config configs/debug.yaml
One GPU:
    deepspeed --num_gpus 1 launch/train.py --config configs/cifar10.yaml
One node, 8 GPUs:
    deepspeed --num_gpus 8 launch/train.py --config configs/lsun_church.yaml train.zero_stage=2 train.precision=bf16
Two nodes, 8 GPUs each, with a hostfile (lines "node-a slots=8", "node-b slots=8") and ssh between them:
    deepspeed --hostfile hostfile --master_addr node-a launch/train.py --config configs/imagenet64.yaml
Two nodes without ssh (Kubernetes, k8s/): run on each node, NODE_RANK 0 or 1:
    deepspeed --no_ssh --hostfile hostfile --node_rank $NODE_RANK --master_addr node-a --master_port 29500 \
        launch/train.py --config configs/imagenet64.yaml --resume auto
The same script runs under torchrun:
    torchrun --nproc_per_node 2 launch/train.py --config configs/debug.yaml
Exit codes (README, "Exit codes"): 0 done, 1 anything else, 2 bad config or data, 3 diverged, 143 stopped by
SIGTERM or SIGINT after a checkpoint. One rank's failure ends every rank with its code (nvp_dist/train/watchdog.py).
"""
import sys

from nvp_dist.train.entry import main

if __name__ == "__main__":
    sys.exit(main())
