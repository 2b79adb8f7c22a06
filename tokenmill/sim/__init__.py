"""L3: offline discrete-event replay of router + mocker workers on a virtual clock."""
