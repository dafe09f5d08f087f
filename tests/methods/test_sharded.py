from tests._subprocess import run_check


def test_every_registry_method_sharded_equals_unsharded_and_keeps_its_shardings():
    # In its own process: the 8 fake CPU devices must be set before JAX starts.
    run_check("tests.methods.sharded_check", "SHARDED_METHODS_OK", timeout=1800)
