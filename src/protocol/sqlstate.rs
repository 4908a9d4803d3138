//! The SQLSTATE codes pgshield itself reports (drivers branch on these, so they must be
//! the codes PostgreSQL would use for the same situation).

/// `too_many_connections`: client limit reached, or no backend within `borrow_timeout`.
pub const TOO_MANY_CONNECTIONS: &str = "53300";
/// `invalid_password`: wrong password, or a user pgshield does not know.
pub const INVALID_PASSWORD: &str = "28P01";
/// `invalid_authorization_specification`: e.g. no user name in the startup packet.
pub const INVALID_AUTHORIZATION: &str = "28000";
/// `invalid_catalog_name`: the database is not configured.
pub const INVALID_CATALOG_NAME: &str = "3D000";
/// `connection_failure`: the backend could not be reached or was lost.
pub const CONNECTION_FAILURE: &str = "08006";
/// `protocol_violation`: malformed or out-of-order messages.
pub const PROTOCOL_VIOLATION: &str = "08P01";
/// `feature_not_supported`.
pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
/// `admin_shutdown`: pgshield is shutting down.
pub const ADMIN_SHUTDOWN: &str = "57P01";
pub const CRASH_SHUTDOWN: &str = "57P02";
pub const CANNOT_CONNECT_NOW: &str = "57P03";
/// `idle_session_timeout`: the client sent nothing for `idle_client_timeout`.
pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
/// A statement cancelled (a cancel request, a statement timeout).
pub const QUERY_CANCELED: &str = "57014";
/// `idle_in_transaction_session_timeout`: idle inside a transaction too long.
pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
/// `SET TRANSACTION ISOLATION LEVEL must be called before any query`.
pub const ACTIVE_SQL_TRANSACTION: &str = "25001";
/// `invalid_parameter_value`: e.g. an `options` string pgshield cannot apply.
pub const INVALID_PARAMETER_VALUE: &str = "22023";
/// `syntax_error`: an admin console command pgshield does not know.
pub const SYNTAX_ERROR: &str = "42601";
/// `insufficient_privilege`: e.g. a role that can no longer be set.
pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
/// `config_file_error`: RELOAD found the new configuration invalid.
pub const CONFIG_FILE_ERROR: &str = "F0000";
/// `successful_completion` class, used for pgshield's own notices.
pub const SUCCESSFUL_COMPLETION: &str = "00000";
