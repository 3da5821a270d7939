"""The gateway in the compose file: the worker's image, its own command, port and health
check, its sessions' history in a volume, and only settings the gateway reads."""

from chatbus.gateway import GatewaySettings
from tests.test_ops_deploy import compose


def test_compose_runs_the_gateway_from_the_workers_image() -> None:
    services = compose()["services"]
    gateway = services["gateway"]

    assert gateway["image"] == services["worker"]["image"]
    assert gateway["command"] == ["chatbus", "gateway"]
    assert gateway["environment"]["GATEWAY_HOST"] == "0.0.0.0"
    assert gateway["ports"] == [f"127.0.0.1:{gateway['environment']['GATEWAY_PORT']}:8080"]
    assert set(gateway["environment"]) <= {name.upper() for name in GatewaySettings.model_fields}
    assert "8080/healthz" in gateway["healthcheck"]["test"][-1]
    assert gateway["depends_on"] == {"rabbitmq": {"condition": "service_healthy"}}
    assert gateway["volumes"] == ["gateway-history:/var/lib/chatbus"]
    assert "gateway-history" in compose()["volumes"]
    history_url = gateway["environment"]["HISTORY_URL"]
    assert history_url == "${HISTORY_URL:-sqlite:////var/lib/chatbus/history.sqlite3}"
    grace = int(gateway["stop_grace_period"].removesuffix("s"))
    assert grace > GatewaySettings.model_fields["graceful_timeout"].default
