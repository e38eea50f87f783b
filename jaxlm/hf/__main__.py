"""`python -m jaxlm.hf`: see `jaxlm.hf`."""

from jaxlm.hf import main

main()
