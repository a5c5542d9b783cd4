"""The `forgeline` command (`main`, the console script's entry point): validate manifests and
write the CRDs, with the tables of `validate --fit` (`fit_cli`) and `plan` (`plan_cli`), a job's
Ray log (`joblogs`, `forgeline logs`) and a job run on this machine or any Ray (`runlocal`,
`forgeline run`). Import-free on purpose, so importing this package pulls in neither kopf nor the
controller: import the module you need.
"""
