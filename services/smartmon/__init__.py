"""Smart monitoring (智能监控): the rules of REFERENCE §8 over the settlement stream.

`rules` (pure rule code) and `rulebook` (the rules file) are used by the stream, the settlement engine's
pre/in-event checks and the demo alike.
"""
