"""The vehicle bus, transport and delivery only: ``payloads`` (the MQTT JSON formats and their assembly),
``sinks`` (where the pipeline's output goes; stdout), ``outbox`` (the durable event queue, with ``fallback``
and ``facts``), ``ledger`` (events started and not yet ended), ``intake`` (an event into the outbox and the
ledger), ``sender`` (outbox rows to the broker: window, acknowledgements, refusals), ``client`` (the broker
connection, paho behind it), ``retained`` and ``outbox_watch``, composed by ``mqtt`` (the broker's sink),
and ``remote`` (operators' ``config/*`` requests: the dispatch table, the request queue and its worker;
the rules in force themselves are ``rules.in_force``).

It may import ``config``, ``messages``, ``errors`` and the rules' public ``OccupantState``; never ``runtime``
or ``vision``.
"""
