//! OpenAPI-only types: the values a string field or query parameter may take, built from the
//! same lists the server checks against, so the document cannot promise more or less.

use sautikit_actors::money::SUPPORTED_CURRENCIES;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};

use crate::webhooks::SUBSCRIBABLE_KINDS;

fn string_enum<'a>(values: impl IntoIterator<Item = &'a str>) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values))
        .into()
}

/// A string schema that is one of a fixed list, for `value_type = …, inline` in annotations.
macro_rules! string_enum {
    ($(#[$doc:meta])* $name:ident, $values:expr) => {
        $(#[$doc])*
        pub struct $name;

        impl utoipa::PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                string_enum($values)
            }
        }

        impl utoipa::ToSchema for $name {}
    };
}

string_enum!(
    /// ISO 4217 codes the wallets take.
    Currency,
    SUPPORTED_CURRENCIES.iter().copied()
);
string_enum!(Capability, ["voice", "sms"]);
string_enum!(NumberStatus, ["active", "suspended", "released"]);
string_enum!(Direction, ["inbound", "outbound"]);
string_enum!(
    CallStatus,
    [
        "ringing",
        "answered",
        "completed",
        "failed",
        "busy",
        "no_answer",
        "canceled",
    ]
);
string_enum!(
    DeliveryStatus,
    ["pending", "succeeded", "dead_letter", "canceled"]
);
string_enum!(TopUpProvider, ["test"]);
string_enum!(
    /// What a workspace webhook may subscribe to.
    EventPattern,
    ["*", "number.*", "wallet.*"]
        .into_iter()
        .chain(SUBSCRIBABLE_KINDS.iter().copied())
);
string_enum!(CredentialStatus, ["active", "revoked"]);
string_enum!(SubscriptionStatus, ["active", "deleted"]);
string_enum!(Transport, ["udp", "tcp"]);
string_enum!(
    LedgerKind,
    ["top_up", "credit", "number_rental", "call_charge"]
);
