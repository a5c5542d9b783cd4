"""Development tooling, never run by the deployed operator: a real etcd + kube-apiserver on
loopback (`devcluster`), the operator as a child process (`operator_process`) and `make demo`
(`demo`, run as `python -m forgeline_operator.dev.demo`), used by the tests, the benches and the
demo. Import-free on purpose: import the module you need.
"""
