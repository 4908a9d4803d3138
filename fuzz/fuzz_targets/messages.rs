//! Every parser of bytes a client or server controls, fed the same input: startup
//! packets, framed messages (client messages through the prepared-statement translator,
//! server messages through the reply tracker), ErrorResponse and ParameterStatus
//! bodies, DataRows, SQL text through the classifier, SCRAM verifiers and client
//! messages, PgBouncer auth files, and certificates through the channel-binding DER
//! reader. Nothing may panic.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgshield::prepared::{ClientStatements, Registry, ServerStatements, Situation};
use pgshield::protocol::frame::split_message;
use pgshield::protocol::messages::ErrorResponse;
use pgshield::protocol::scram::{Channel, ScramExchange, ScramVerifier};
use pgshield::server::state::ReplyTracker;

fuzz_target!(|data: &[u8]| {
    let _ = pgshield::protocol::startup::parse(data);
    let _ = ErrorResponse::parse(data);
    let _ = pgshield::server::parse_parameter_status(data);
    let _ = pgshield::server::parse_data_row(data);
    let _ = pgshield::tls::server_end_point(data);
    // SQL text in any client encoding: the raw bytes, as a Query carries them.
    let _ = pgshield::client::sql::classify(data);
    let _ = pgshield::client::sql::fixed_result(data);
    let text = String::from_utf8_lossy(data);
    let _ = ScramVerifier::parse(&text);
    // A PgBouncer auth_file (auth.file).
    let _ = pgshield::config::parse_auth_file(&text);

    // PBKDF2 once, not per run.
    static VERIFIER: std::sync::OnceLock<ScramVerifier> = std::sync::OnceLock::new();
    let verifier = VERIFIER.get_or_init(|| ScramVerifier::from_password("pw"));
    let cb = [0u8; 32];
    for channel in [
        Channel::Unbound { could_bind: false },
        Channel::Unbound { could_bind: true },
        Channel::Bound(&cb),
    ] {
        if let Ok((exchange, _)) = ScramExchange::start(verifier, data, channel) {
            let _ = exchange.finish(data);
        }
    }

    // The same bytes as a stream of client messages, then of server replies.
    let registry = Registry::default();
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::new(4);
    let mut out = BytesMut::new();
    let mut buf = BytesMut::from(data);
    // A small statement limit, so refusals are reached too.
    let mut situation = Situation {
        max_named: 3,
        batch_open: false,
        batch: 0,
        can_hold: true,
        parse_env: 0,
        failed_transaction: false,
    };
    while let Ok(Some((tag, body))) = split_message(&mut buf, 1 << 20) {
        if tag == b'S' {
            server.batch_ended();
        }
        if matches!(tag, b'P' | b'B' | b'D' | b'C') {
            let mut msg = BytesMut::with_capacity(body.len() + 5);
            msg.extend_from_slice(&[tag]);
            msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
            msg.extend_from_slice(&body);
            let limits = (situation.max_named, situation.parse_env);
            let _ = client.answer_without_backend(&registry, &msg, limits);
            let _ = client.translate(&registry, &mut server, &msg, msg.len(), &mut out, situation);
        }
        situation.batch_open = tag != b'S';
        // Another client's settings, now and then.
        situation.parse_env = u64::from(tag == b'H');
        situation.batch += u64::from(tag == b'S');
        // A failed transaction, now and then.
        situation.failed_transaction = tag == b'E';
    }
    let mut tracker = ReplyTracker::default();
    for tag in [b'P', b'B', b'E', b'S', b'Q'] {
        tracker.sent(tag);
    }
    let mut buf = BytesMut::from(data);
    while let Ok(Some((tag, body))) = split_message(&mut buf, 1 << 20) {
        if tag == b'T' {
            let _ = pgshield::prepared::Shape::of(&body);
        }
        if tracker.received(tag, body.first().copied()).is_err() {
            break;
        }
    }
});
