"""Beyond one process: tensor parallelism on torch.distributed (tensor_parallel, tp_runner) and replicas on Ray
Serve (replicas). Nothing here is imported unless a user asks for more than one process."""
