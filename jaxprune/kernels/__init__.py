"""What makes the models fast on each backend: the convolution (conv), BatchNorm (norm) and XLA
options (compiler), chosen by one recorded `PerformanceOptions` value (options)."""
