"""What the CPU and CUDA schedules share: the rule protocol, block analysis, the convolution matcher."""
