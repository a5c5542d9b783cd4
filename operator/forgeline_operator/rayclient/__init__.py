"""Talking to Ray, shared by the controller and the command line: submit and track trainer runs
over the Ray Jobs API (`rayjobs`), start an embedded Ray head on this machine (`localray`), and
pick free loopback ports for the processes Forgeline starts itself (`ports`). Import-free on
purpose: import the module you need.
"""
