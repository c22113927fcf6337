"""The command-line tools (``vllm-trianglemix demo | serve | bench | calibrate |
check-accuracy``). Nothing here is imported by the plugin itself: the core route
is config -> registration/selection -> backends -> ops."""
