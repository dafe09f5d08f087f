from tests._subprocess import run_check


def test_numerical_core_sharded_over_8_fake_devices_matches_unsharded():
    run_check("tests.sharding_check", "SHARDING_OK")
