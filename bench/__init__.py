"""vmha benchmarks; results and the machine they ran on are in bench/README.md."""
