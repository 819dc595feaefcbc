from tests.support.fixtures import (  # noqa: F401
    auth_server,
    fake_time,
    local_ca,
    make_outbound,
    outbound,
    scripted_server,
    server_tls,
)
