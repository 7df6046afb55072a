"""What makes the models fast on each backend: the convolution (conv), BatchNorm (norm) and
the XLA options every jitted model function compiles with (compiler), chosen by one recorded
`PerformanceOptions` value (options)."""
