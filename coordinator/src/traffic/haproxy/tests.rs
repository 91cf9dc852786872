//! Parsers checked on answers captured from HAProxy 2.6.12 (Debian 12).

use super::*;

const SERVERS_STATE_HEADER: &str = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n";

const STAT_HEADER: &str = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,ttime,agent_status,agent_code,agent_duration,check_desc,agent_desc,check_rise,check_fall,check_health,agent_rise,agent_fall,agent_health,addr,cookie,mode,algo,conn_rate,conn_rate_max,conn_tot,intercepted,dcon,dses,wrew,connect,reuse,cache_lookups,cache_hits,srv_icur,src_ilim,qtime_max,ctime_max,rtime_max,ttime_max,eint,idle_conn_cur,safe_conn_cur,used_conn_cur,need_conn_est,uweight,agg_server_status,agg_server_check_status,agg_check_status,-,ssl_sess,ssl_reused_sess,ssl_failed_handshake,h2_headers_rcvd,h2_data_rcvd,h2_settings_rcvd,h2_rst_stream_rcvd,h2_goaway_rcvd,h2_detected_conn_protocol_errors,h2_detected_strm_protocol_errors,h2_rst_stream_resp,h2_goaway_resp,h2_open_connections,h2_backend_open_streams,h2_total_connections,h2_backend_total_streams,h1_open_connections,h1_open_streams,h1_total_connections,h1_total_streams,h1_bytes_in,h1_bytes_out,h1_spliced_bytes_in,h1_spliced_bytes_out,\n";

/// Server `a` ready, `b` ready.
const ROWS_READY: &str = "3 app 1 a 127.0.0.1 2 0 1 1 3 15 3 2 6 0 0 0 - 19081 - 0 0 - - 0\n3 app 2 b 127.0.0.1 2 0 1 1 3 15 3 2 6 0 0 0 - 19082 - 0 0 - - 0\n\n";
/// After `set server app/a state drain`.
const ROWS_A_DRAIN: &str = "3 app 1 a 127.0.0.1 2 8 1 1 1 15 3 2 6 0 0 0 - 19081 - 0 0 - - 0\n3 app 2 b 127.0.0.1 2 0 1 1 5 15 3 2 6 0 0 0 - 19082 - 0 0 - - 0\n\n";
/// After `set server app/a state maint`: forced maintenance also stops the server.
const ROWS_A_MAINT: &str = "3 app 1 a 127.0.0.1 0 1 1 1 0 15 3 0 14 0 0 0 - 19081 - 0 0 - - 0\n3 app 2 b 127.0.0.1 2 0 1 1 5 15 3 2 6 0 0 0 - 19082 - 0 0 - - 0\n\n";

/// `show stat app 4 -1` with one long request in flight on `a`, while draining.
const STAT_A_DRAIN_ONE_SESSION: &str = "app,a,0,0,1,1,,1,0,0,,0,,0,0,0,0,DRAIN,1,1,0,1,1,0,0,,1,3,1,,0,,2,1,,1,* L7OK,0,0,0,0,0,0,0,0,,,,0,0,0,,,,,1,,,0,0,0,0,,,,Layer7 check passed,,1,2,2,,,,127.0.0.1:19081,,http,,,,,,,,0,1,0,,,0,,0,0,0,0,0,0,0,1,2,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,\napp,b,0,0,0,0,,0,0,0,,0,,0,0,0,0,UP,1,1,0,1,1,1,0,,1,3,2,,0,,2,0,,0,L7OK,200,2,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0,,,,Layer7 check passed,,1,2,2,,,,127.0.0.1:19082,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,1,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,\n\n";
/// Plain `show stat`: the frontend and backend rows come with the servers.
const STAT_ALL_IDLE: &str = "web,FRONTEND,,,0,0,9984,0,0,0,0,0,0,,,,,OPEN,,,,,,,,,1,2,0,,,,0,0,0,0,,,,0,0,0,0,0,0,,0,0,0,,,0,0,0,0,,,,,,,,,,,,,,,,,,,,,http,,0,0,0,0,0,0,0,,,0,0,,,,,,,0,,,,,,,,,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,\napp,a,0,0,0,0,,0,0,0,,0,,0,0,0,0,UP,1,1,0,1,1,4,0,,1,3,1,,0,,2,0,,0,L7OK,200,1,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0,,,,Layer7 check passed,,1,2,2,,,,127.0.0.1:19081,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,1,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,\napp,b,0,0,0,0,,0,0,0,,0,,0,0,0,0,UP,1,1,0,1,1,4,0,,1,3,2,,0,,2,0,,0,L7OK,200,2,0,0,0,0,0,0,,,,0,0,0,,,,,-1,,,0,0,0,0,,,,Layer7 check passed,,1,2,2,,,,127.0.0.1:19082,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,1,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,\napp,BACKEND,0,0,0,0,999,0,0,0,0,0,,0,0,0,0,UP,2,2,0,,1,4,0,,1,3,0,,0,,1,0,,0,,,,0,0,0,0,0,0,,,,0,0,0,0,0,0,0,-1,,,0,0,0,0,,,,,,,,,,,,,,http,roundrobin,,,,,,,0,0,0,0,0,,,0,0,0,0,0,,,,,2,0,0,0,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,68,68,7246,1560,0,0,\n\n";

fn refused(message: &str) -> ResponseError {
    ResponseError::Refused(message.to_owned())
}

#[test]
fn set_server_responses() {
    let cases: &[(&str, Result<(), ResponseError>)] = &[
        ("\n", Ok(())),
        ("No such server.\n\n", Err(refused("No such server."))),
        ("No such backend.\n\n", Err(refused("No such backend."))),
        (
            "'set server <srv> state' expects 'ready', 'drain' and 'maint'.\n\n",
            Err(refused(
                "'set server <srv> state' expects 'ready', 'drain' and 'maint'.",
            )),
        ),
        ("Permission denied\n\n", Err(refused("Permission denied"))),
    ];
    for (response, expected) in cases {
        assert_eq!(&parse_set_server_response(response), expected, "{response:?}");
    }
}

#[test]
fn servers_state_responses() {
    let ready = format!("{SERVERS_STATE_HEADER}{ROWS_READY}");
    let drain = format!("{SERVERS_STATE_HEADER}{ROWS_A_DRAIN}");
    let maint = format!("{SERVERS_STATE_HEADER}{ROWS_A_MAINT}");
    let forced_drain_and_inherited_maint =
        format!("{SERVERS_STATE_HEADER}3 app 1 a 127.0.0.1 0 10 1 1 0 15 3 0 14 0 0 0 - 19081 - 0 0 - - 0\n\n");
    let short_row = format!("{SERVERS_STATE_HEADER}3 app 1 a 127.0.0.1 2 0\n\n");
    let other_version = SERVERS_STATE_HEADER.replacen('1', "2", 1);
    type Parsed = Result<(AdminState, OperationalState), ResponseError>;
    let cases: Vec<(&str, &str, Parsed)> = vec![
        (&ready, "a", Ok((AdminState::Ready, OperationalState::Running))),
        (&ready, "b", Ok((AdminState::Ready, OperationalState::Running))),
        (&drain, "a", Ok((AdminState::Drain, OperationalState::Running))),
        (&drain, "b", Ok((AdminState::Ready, OperationalState::Running))),
        (&maint, "a", Ok((AdminState::Maint, OperationalState::Stopped))),
        (
            &forced_drain_and_inherited_maint,
            "a",
            Ok((AdminState::Maint, OperationalState::Stopped)),
        ),
        (&ready, "c", Err(ResponseError::ServerNotFound)),
        ("Can't find backend.\n\n", "a", Err(refused("Can't find backend."))),
        (
            &short_row,
            "a",
            Err(ResponseError::Unexpected(
                "a row has 7 fields for 25 columns: \"3 app 1 a 127.0.0.1 2 0\"".to_owned(),
            )),
        ),
        (
            &other_version,
            "a",
            Err(ResponseError::Unexpected("format version \"2\", expected 1".to_owned())),
        ),
        ("", "a", Err(refused(""))),
    ];
    for (response, server, expected) in cases {
        assert_eq!(
            parse_servers_state(response, "app", server),
            expected,
            "{server} in {response:?}"
        );
    }
    assert_eq!(
        parse_servers_state(&ready, "other", "a"),
        Err(ResponseError::ServerNotFound)
    );
}

#[test]
fn check_state_responses() {
    // Captured from HAProxy 2.6.12: `a` with `check` (srv_check_state 6: configured and enabled),
    // `b` without (0), and `a` in maintenance, where checks stay enabled (14 adds paused).
    let rows = "3 app 1 a 127.0.0.1 2 0 1 1 2 17 2 0 6 0 0 0 - 18081 - 0 0 - - 0\n\
                3 app 2 b 127.0.0.1 2 0 1 1 2 1 0 2 0 0 0 0 - 18082 - 0 0 - - 0\n\n";
    let response = format!("{SERVERS_STATE_HEADER}{rows}");
    assert_eq!(parse_checks_enabled(&response, "app", "a"), Ok(true));
    assert_eq!(parse_checks_enabled(&response, "app", "b"), Ok(false));
    let maint = format!("{SERVERS_STATE_HEADER}{ROWS_A_MAINT}");
    assert_eq!(parse_checks_enabled(&maint, "app", "a"), Ok(true));
    assert_eq!(
        parse_checks_enabled(&response, "app", "c"),
        Err(ResponseError::ServerNotFound)
    );
}

#[test]
fn stat_responses() {
    let draining = format!("{STAT_HEADER}{STAT_A_DRAIN_ONE_SESSION}");
    let idle = format!("{STAT_HEADER}{STAT_ALL_IDLE}");
    let bad_number = format!("{STAT_HEADER}app,a,0,0,many,0\n\n");
    let cases: Vec<(&str, &str, Result<u64, ResponseError>)> = vec![
        (&draining, "a", Ok(1)),
        (&draining, "b", Ok(0)),
        (&idle, "a", Ok(0)),
        (&idle, "BACKEND", Ok(0)),
        (&idle, "c", Err(ResponseError::ServerNotFound)),
        ("No such proxy.\n\n", "a", Err(refused("No such proxy."))),
        (
            &bad_number,
            "a",
            Err(ResponseError::Unexpected("scur is \"many\", not a number".to_owned())),
        ),
    ];
    for (response, server, expected) in cases {
        assert_eq!(
            parse_stat(response, "app", server),
            expected,
            "{server} in {response:?}"
        );
    }
}

#[test]
fn names_that_could_smuggle_commands_are_refused() {
    let target = |backend: &str, server: &str| TrafficTarget {
        instance_id: "i-1".to_owned(),
        backend: backend.to_owned(),
        server: server.to_owned(),
    };
    assert!(check_names(&target("app", "web-1.a_b:2")).is_ok());
    for (backend, server) in [
        ("app", "a; shutdown frontend web"),
        ("app", "a\nshow info"),
        ("", "a"),
        ("app", "a b"),
    ] {
        let error = check_names(&target(backend, server)).expect_err("an invalid name");
        assert!(matches!(error, TrafficError::InvalidName { .. }), "{error}");
    }
}
