"""The sizing science, as pure functions: will a job fit in GPU memory (`fit`, after the ZeRO
paper) and how big a model on how many tokens for a compute budget (`planning`, published scaling
laws). The controller's `Fits` condition and the `forgeline validate --fit` / `forgeline plan`
commands both read them. Import-free on purpose: import the module you need.
"""
