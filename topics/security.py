"""Kafka's admin requests for SCRAM users and ACLs, over an authenticated aiokafka admin client.

aiokafka 0.14 ships the ACL request structs but no admin methods for them, and nothing for SCRAM
credentials (KIP-554): the two user requests are declared here from Kafka's message specs
(DescribeUserScramCredentials, key 50, and AlterUserScramCredentials, key 51, both v0 and flexible).
The client computes the salted password (RFC 5802: PBKDF2-HMAC-SHA-512 over a random salt), so the
password itself never travels.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import for_code
from aiokafka.protocol.admin import CreateAclsRequest_v1, DeleteAclsRequest_v1, DescribeAclsRequest
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    CompactArray,
    CompactBytes,
    CompactString,
    Int8,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)

SCRAM_SHA_512 = 2  # the mechanism's number in the SCRAM requests
SCRAM_ITERATIONS = 8192  # Kafka's minimum is 4096
ERROR_NONE = 0
RESOURCE_NOT_FOUND = 91  # DescribeUserScramCredentials: the user has no credential

# ACL codes (org.apache.kafka.common.acl / resource)
TOPIC, GROUP, CLUSTER, TRANSACTIONAL_ID = 2, 3, 4, 5
LITERAL, PREFIXED = 3, 4
OP_READ, OP_WRITE, OP_DESCRIBE = 3, 4, 8
ALLOW = 3
ANY = 1  # filters: any resource type, pattern type, operation or permission


class DescribeUserScramCredentialsResponse_v0(Response):
    API_KEY = 50
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        ("error_message", CompactString("utf-8")),
        ("results", CompactArray(
            ("user", CompactString("utf-8")),
            ("error_code", Int16),
            ("error_message", CompactString("utf-8")),
            ("credential_infos", CompactArray(("mechanism", Int8), ("iterations", Int32), ("tags", TaggedFields))),
            ("tags", TaggedFields),
        )),
        ("tags", TaggedFields),
    )


class DescribeUserScramCredentialsRequest_v0(RequestStruct):
    API_KEY = 50
    API_VERSION = 0
    FLEXIBLE_VERSION = True
    RESPONSE_TYPE = DescribeUserScramCredentialsResponse_v0
    SCHEMA = Schema(
        ("users", CompactArray(("name", CompactString("utf-8")), ("tags", TaggedFields))),
        ("tags", TaggedFields),
    )


class DescribeUserScramCredentials(Request[DescribeUserScramCredentialsRequest_v0]):
    API_KEY = 50

    def __init__(self, users: Sequence[str]) -> None:
        self.users = users

    def build(self, request_struct_class: type[DescribeUserScramCredentialsRequest_v0]
              ) -> DescribeUserScramCredentialsRequest_v0:
        return request_struct_class([(u, {}) for u in self.users], {})


class AlterUserScramCredentialsResponse_v0(Response):
    API_KEY = 51
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("results", CompactArray(
            ("user", CompactString("utf-8")),
            ("error_code", Int16),
            ("error_message", CompactString("utf-8")),
            ("tags", TaggedFields),
        )),
        ("tags", TaggedFields),
    )


class AlterUserScramCredentialsRequest_v0(RequestStruct):
    API_KEY = 51
    API_VERSION = 0
    FLEXIBLE_VERSION = True
    RESPONSE_TYPE = AlterUserScramCredentialsResponse_v0
    SCHEMA = Schema(
        ("deletions", CompactArray(("name", CompactString("utf-8")), ("mechanism", Int8), ("tags", TaggedFields))),
        ("upsertions", CompactArray(
            ("name", CompactString("utf-8")),
            ("mechanism", Int8),
            ("iterations", Int32),
            ("salt", CompactBytes),
            ("salted_password", CompactBytes),
            ("tags", TaggedFields),
        )),
        ("tags", TaggedFields),
    )


class AlterUserScramCredentials(Request[AlterUserScramCredentialsRequest_v0]):
    API_KEY = 51

    def __init__(self, deletions: Sequence[str], upsertions: Sequence[tuple[str, str]]) -> None:
        self.deletions = deletions
        self.upsertions = upsertions

    def build(self, request_struct_class: type[AlterUserScramCredentialsRequest_v0]
              ) -> AlterUserScramCredentialsRequest_v0:
        upserts: list[tuple[Any, ...]] = []
        for name, secret in self.upsertions:
            salt = os.urandom(32)
            salted = hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, SCRAM_ITERATIONS)
            upserts.append((name, SCRAM_SHA_512, SCRAM_ITERATIONS, salt, salted, {}))
        return request_struct_class([(n, SCRAM_SHA_512, {}) for n in self.deletions], upserts, {})


@dataclass(frozen=True, order=True)
class Acl:
    """One ALLOW rule: `principal` ("User:<name>") may do `operation` on the resource."""

    principal: str
    resource_type: int
    name: str
    pattern: int
    operation: int

    def creation(self) -> tuple[Any, ...]:
        return (self.resource_type, self.name, self.pattern, self.principal, "*", self.operation, ALLOW)

    def filter(self) -> tuple[Any, ...]:
        return (self.resource_type, self.name, self.pattern, self.principal, "*", self.operation, ALLOW)


CreateAclsStruct: TypeAlias = CreateAclsRequest_v1
DeleteAclsStruct: TypeAlias = DeleteAclsRequest_v1


class CreateAcls(Request[CreateAclsStruct]):
    """Many ACLs in one request (aiokafka's own CreateAclsRequest carries one)."""

    API_KEY = 30

    def __init__(self, acls: Sequence[Acl]) -> None:
        self.acls = acls

    def build(self, request_struct_class: type[CreateAclsStruct]) -> CreateAclsStruct:
        return request_struct_class([a.creation() for a in self.acls])


class DeleteAcls(Request[DeleteAclsStruct]):
    API_KEY = 31

    def __init__(self, acls: Sequence[Acl]) -> None:
        self.acls = acls

    def build(self, request_struct_class: type[DeleteAclsStruct]) -> DeleteAclsStruct:
        return request_struct_class([a.filter() for a in self.acls])


class SecurityAdminError(RuntimeError):
    """The broker refused a user or ACL change (its error name, never a password)."""


def _raise_for(code: int, what: str, message: str | None) -> None:
    if code != ERROR_NONE:
        raise SecurityAdminError(f"{what}: {for_code(code).__name__}{': ' + message if message else ''}")


async def _send(admin: AIOKafkaAdminClient, request: Request, node_id: int | None = None) -> Any:
    # Any broker answers (it forwards user and ACL changes to the active controller).
    return await admin._send_request(request, node_id)  # aiokafka has no public method for these requests


async def users_with_credentials(admin: AIOKafkaAdminClient, names: Iterable[str],
                                 node_id: int | None = None) -> set[str]:
    """Which of `names` have a SCRAM-SHA-512 credential (as broker `node_id`, any by default, knows)."""
    names = list(names)
    resp = await _send(admin, DescribeUserScramCredentials(names), node_id)
    _raise_for(resp.error_code, "describe SCRAM users", resp.error_message)
    found = set()
    for user, code, message, infos, _tags in resp.results:
        if code == RESOURCE_NOT_FOUND:
            continue
        _raise_for(code, f"describe SCRAM user {user}", message)
        if any(mechanism == SCRAM_SHA_512 for mechanism, _iterations, _t in infos):
            found.add(user)
    return found


async def set_passwords(admin: AIOKafkaAdminClient, passwords: dict[str, str], timeout_s: float = 15.0) -> None:
    """Create or replace the SCRAM-SHA-512 credential of each user; returns when every broker knows them."""
    if not passwords:
        return
    resp = await _send(admin, AlterUserScramCredentials([], list(passwords.items())))
    for user, code, message, _tags in resp.results:
        _raise_for(code, f"set SCRAM credential of {user}", message)
    deadline = time.monotonic() + timeout_s
    for node in [b.nodeId for b in admin._client.cluster.brokers()]:
        while await users_with_credentials(admin, passwords, node) != set(passwords):
            if time.monotonic() > deadline:
                raise SecurityAdminError(f"SCRAM users not known to broker {node} after {timeout_s:.0f} s")
            await asyncio.sleep(0.1)


async def delete_users(admin: AIOKafkaAdminClient, names: Sequence[str]) -> None:
    resp = await _send(admin, AlterUserScramCredentials(names, []))
    for user, code, message, _tags in resp.results:
        _raise_for(code, f"delete SCRAM credential of {user}", message)


async def create_acls(admin: AIOKafkaAdminClient, acls: Sequence[Acl]) -> None:
    """Adds the rules (an existing identical rule is left as it is)."""
    if not acls:
        return
    resp = await _send(admin, CreateAcls(acls))
    for (code, message), acl in zip(resp.creation_responses, acls, strict=True):
        _raise_for(code, f"create ACL {acl}", message)


async def delete_acls(admin: AIOKafkaAdminClient, acls: Sequence[Acl]) -> int:
    """Removes exactly these rules; returns how many the broker held."""
    if not acls:
        return 0
    resp = await _send(admin, DeleteAcls(acls))
    deleted = 0
    for code, message, matching in resp.filter_responses:
        _raise_for(code, "delete ACLs", message)
        deleted += len(matching)
    return deleted


ACL_WAIT_S = 15.0


async def acls_on(admin: AIOKafkaAdminClient, node_id: int | None = None) -> set[Acl]:
    """Every ALLOW rule broker `node_id` (any by default) holds."""
    resp = await _send(admin, DescribeAclsRequest(ANY, None, ANY, None, None, ANY, ANY), node_id)
    _raise_for(resp.error_code, "describe ACLs", resp.error_message)
    return {Acl(principal, rtype, name, pattern, op)
            for rtype, name, pattern, rules in resp.resources
            for principal, _host, op, permission in rules if permission == ALLOW}


async def wait_for_acls(admin: AIOKafkaAdminClient, acls: Sequence[Acl], present: bool = True,
                        timeout_s: float = ACL_WAIT_S) -> None:
    """Until every broker's authorizer holds (or no longer holds) the rules: a broker applies a change
    from the metadata log a moment after the controller committed it, and a client started right
    after topics.apply must not meet a refusal."""
    wanted = set(acls)
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = [b.nodeId for b in admin._client.cluster.brokers()]  # every broker authorizes for itself
        views = [await acls_on(admin, node) for node in nodes]
        if all((wanted <= view) if present else not (wanted & view) for view in views):
            return
        if time.monotonic() > deadline:
            raise SecurityAdminError(f"ACL change not visible on every broker after {timeout_s:.0f} s")
        await asyncio.sleep(0.1)
