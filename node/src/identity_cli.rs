//! `drplane identity …`: log in, and administer projects, users, roles and credentials
//! through the native identity API (`/drplane/v1/identity/…`, admin only).
//!
//! Users, projects and roles are given as positional arguments (id or name), so they never
//! clash with the global `--user`/`--password` that say who runs the command.

use anyhow::anyhow;
use serde_json::{json, Value};

use crate::cli::{cell, encode_path_segment, print_json, render_table, ConnArgs, Doc, Output, Req};

/// `drplane identity …`
#[derive(clap::Args, Debug)]
pub struct IdentityArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(subcommand)]
    pub command: IdentityCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum IdentityCommand {
    /// Log in with --user/--password (Keystone password method) and print the token, for
    /// `export DRPLANE_TOKEN=$(drplane identity login …)`.
    Login,
    /// Who the credentials belong to: user, project, roles.
    Whoami,
    /// Projects.
    #[command(subcommand)]
    Projects(ProjectsCommand),
    /// Users.
    #[command(subcommand)]
    Users(UsersCommand),
    /// Role assignments (admin, member, reader per project).
    #[command(subcommand)]
    Roles(RolesCommand),
    /// Huawei AK/SK pairs (SDRS, ECS).
    #[command(subcommand, name = "access-keys")]
    AccessKeys(CredentialCommand),
    /// Danube API keys (`ES-API-KEY`).
    #[command(subcommand, name = "api-keys")]
    ApiKeys(CredentialCommand),
    /// Tokens: list, issue for a user, revoke.
    #[command(subcommand)]
    Tokens(TokensCommand),
}

#[derive(clap::Subcommand, Debug)]
pub enum ProjectsCommand {
    List,
    /// Create a project.
    Create {
        /// Letters, digits, '.', '_' and '-', at most 64 characters.
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Show a project (id or name).
    Show {
        project: String,
    },
    /// Delete a project with its role assignments and credentials.
    Delete {
        project: String,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum UsersCommand {
    List,
    /// Create a user; without --new-password one is generated and printed once.
    Create {
        name: String,
        /// The new user's password (prefer leaving it out: a flag shows in `ps`).
        #[arg(long)]
        new_password: Option<String>,
        /// Project (id or name) to grant --role on; also the user's default project.
        #[arg(long = "in-project")]
        in_project: Option<String>,
        /// Role to grant on --in-project: admin, member or reader.
        #[arg(long)]
        role: Option<String>,
    },
    /// Show a user (id or name) with its role assignments.
    Show {
        #[arg(value_name = "USER")]
        who: String,
    },
    /// Change a user's password, enabled flag or default project.
    Set {
        #[arg(value_name = "USER")]
        who: String,
        #[arg(long)]
        new_password: Option<String>,
        #[arg(long)]
        enabled: Option<bool>,
        #[arg(long)]
        default_project: Option<String>,
    },
    /// Delete a user with its role assignments and credentials.
    Delete {
        #[arg(value_name = "USER")]
        who: String,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum RolesCommand {
    /// List assignments, optionally of one user and/or on one project.
    List {
        #[arg(long = "of-user")]
        of_user: Option<String>,
        #[arg(long = "on-project")]
        on_project: Option<String>,
    },
    /// Grant ROLE on PROJECT to USER.
    Grant {
        #[arg(value_name = "USER")]
        who: String,
        project: String,
        role: String,
    },
    /// Revoke ROLE on PROJECT from USER.
    Revoke {
        #[arg(value_name = "USER")]
        who: String,
        project: String,
        role: String,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum CredentialCommand {
    /// List (secrets are never listed).
    List {
        #[arg(long = "of-user")]
        of_user: Option<String>,
    },
    /// Create one for USER in a project (default: the user's default project); the secret
    /// is printed once.
    Create {
        #[arg(value_name = "USER")]
        who: String,
        #[arg(long = "in-project")]
        in_project: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Delete one (access key, or API key id).
    Delete { id: String },
}

#[derive(clap::Subcommand, Debug)]
pub enum TokensCommand {
    List {
        #[arg(long = "of-user")]
        of_user: Option<String>,
    },
    /// Issue a token for USER (admin); printed once.
    Issue {
        #[arg(value_name = "USER")]
        who: String,
        #[arg(long = "in-project")]
        in_project: Option<String>,
        /// Lifetime in seconds (1 to 2592000); one hour by default.
        #[arg(long)]
        expires_in: Option<u64>,
    },
    /// Revoke a token by id.
    Revoke { id: String },
}

fn seg(s: &str) -> String {
    encode_path_segment(s)
}

/// `?k=v&…` of the given pairs (values encoded), or "".
fn query(pairs: &[(&str, &Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", seg(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

fn list_of<'a>(doc: &'a Doc, key: &str) -> anyhow::Result<&'a Vec<Value>> {
    doc.value
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("unexpected answer: no \"{key}\" array"))
}

fn table(rows: &[Value], columns: &[(&str, &str)]) -> String {
    let headers: Vec<&str> = columns.iter().map(|(h, _)| *h).collect();
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            columns
                .iter()
                .map(|(_, k)| match r.get(*k) {
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|v| cell(Some(v)))
                        .collect::<Vec<_>>()
                        .join(","),
                    other => cell(other),
                })
                .collect()
        })
        .collect();
    render_table(&headers, &rows)
}

const PROJECT_COLS: &[(&str, &str)] = &[
    ("ID", "id"),
    ("NAME", "name"),
    ("ENABLED", "enabled"),
    ("CREATED_AT", "created_at"),
    ("DESCRIPTION", "description"),
];
const USER_COLS: &[(&str, &str)] = &[
    ("ID", "id"),
    ("NAME", "name"),
    ("ENABLED", "enabled"),
    ("DEFAULT_PROJECT", "default_project_id"),
    ("CREATED_AT", "created_at"),
];
const ROLE_COLS: &[(&str, &str)] = &[
    ("USER", "user_name"),
    ("PROJECT", "project_name"),
    ("ROLE", "role"),
    ("USER_ID", "user_id"),
    ("PROJECT_ID", "project_id"),
];
const AK_COLS: &[(&str, &str)] = &[
    ("ACCESS_KEY", "access_key"),
    ("USER_ID", "user_id"),
    ("PROJECT_ID", "project_id"),
    ("CREATED_AT", "created_at"),
    ("DESCRIPTION", "description"),
];
const APIKEY_COLS: &[(&str, &str)] = &[
    ("ID", "id"),
    ("USER_ID", "user_id"),
    ("PROJECT_ID", "project_id"),
    ("CREATED_AT", "created_at"),
    ("DESCRIPTION", "description"),
];
const TOKEN_COLS: &[(&str, &str)] = &[
    ("ID", "id"),
    ("USER_ID", "user_id"),
    ("PROJECT_ID", "project_id"),
    ("METHOD", "method"),
    ("ROLES", "roles"),
    ("EXPIRES_AT", "expires_at"),
    ("REVOKED", "revoked"),
];

/// Prints a document as JSON, or as a one-row table plus the once-shown secrets.
fn print_one(out: Output, doc: &Doc, cols: &[(&str, &str)], secrets: &[(&str, &str)]) {
    match out {
        Output::Json => print_json(doc),
        Output::Table => {
            print!("{}", table(std::slice::from_ref(&doc.value), cols));
            for (label, key) in secrets {
                if let Some(v) = doc.value.get(*key).and_then(Value::as_str) {
                    println!("{label} (shown only once): {v}");
                }
            }
        }
    }
}

fn print_list(out: Output, doc: &Doc, key: &str, cols: &[(&str, &str)]) -> anyhow::Result<()> {
    match out {
        Output::Json => print_json(doc),
        Output::Table => print!("{}", table(list_of(doc, key)?, cols)),
    }
    Ok(())
}

pub async fn run(args: IdentityArgs) -> anyhow::Result<()> {
    let api = args.conn.api()?;
    let out = args.conn.output;
    let base = "/drplane/v1/identity";
    match args.command {
        IdentityCommand::Login => {
            let (Some(user), Some(password)) = (&args.conn.user, &args.conn.password) else {
                anyhow::bail!(
                    "login needs --user and --password (or DRPLANE_USER and DRPLANE_PASSWORD)"
                );
            };
            let (token, body) = api
                .login(user, password, args.conn.login_project.as_deref())
                .await?;
            match out {
                Output::Json => {
                    let mut body = body;
                    if let Some(obj) = body.as_object_mut() {
                        obj.insert("x_subject_token".into(), json!(token));
                    }
                    println!("{}", serde_json::to_string_pretty(&body)?);
                }
                Output::Table => println!("{token}"),
            }
            Ok(())
        }
        IdentityCommand::Whoami => {
            let doc = api
                .send(Req::get("/drplane/v1/auth/whoami"))
                .await?
                .into_json()?;
            print_one(
                out,
                &doc,
                &[
                    ("USER", "user_name"),
                    ("PROJECT", "project_name"),
                    ("ROLES", "roles"),
                    ("METHOD", "method"),
                    ("USER_ID", "user_id"),
                    ("PROJECT_ID", "project_id"),
                ],
                &[],
            );
            Ok(())
        }
        IdentityCommand::Projects(cmd) => match cmd {
            ProjectsCommand::List => {
                let doc = api
                    .send(Req::get(&format!("{base}/projects")))
                    .await?
                    .into_json()?;
                print_list(out, &doc, "projects", PROJECT_COLS)
            }
            ProjectsCommand::Create { name, description } => {
                let body = json!({"name": name, "description": description});
                let doc = api
                    .send(Req::post(&format!("{base}/projects"), Some(body)).idempotent_write())
                    .await?
                    .into_json()?;
                print_one(out, &doc, PROJECT_COLS, &[]);
                Ok(())
            }
            ProjectsCommand::Show { project } => {
                let doc = api
                    .send(Req::get(&format!("{base}/projects/{}", seg(&project))))
                    .await?
                    .into_json()?;
                print_one(out, &doc, PROJECT_COLS, &[]);
                Ok(())
            }
            ProjectsCommand::Delete { project } => {
                api.send(Req::delete(&format!("{base}/projects/{}", seg(&project))))
                    .await?;
                println!("deleted project {project}");
                Ok(())
            }
        },
        IdentityCommand::Users(cmd) => match cmd {
            UsersCommand::List => {
                let doc = api
                    .send(Req::get(&format!("{base}/users")))
                    .await?
                    .into_json()?;
                print_list(out, &doc, "users", USER_COLS)
            }
            UsersCommand::Create {
                name,
                new_password,
                in_project,
                role,
            } => {
                let mut body = json!({"name": name});
                if let Some(p) = new_password {
                    body["password"] = json!(p);
                }
                if let Some(p) = in_project {
                    body["project"] = json!(p);
                }
                if let Some(r) = role {
                    body["role"] = json!(r);
                }
                let doc = api
                    .send(Req::post(&format!("{base}/users"), Some(body)).idempotent_write())
                    .await?
                    .into_json()?;
                print_one(out, &doc, USER_COLS, &[("password", "password")]);
                Ok(())
            }
            UsersCommand::Show { who } => {
                let doc = api
                    .send(Req::get(&format!("{base}/users/{}", seg(&who))))
                    .await?
                    .into_json()?;
                match out {
                    Output::Json => print_json(&doc),
                    Output::Table => {
                        print!("{}", table(std::slice::from_ref(&doc.value), USER_COLS));
                        if let Some(roles) =
                            doc.value.get("role_assignments").and_then(Value::as_array)
                        {
                            println!();
                            print!("{}", table(roles, ROLE_COLS));
                        }
                    }
                }
                Ok(())
            }
            UsersCommand::Set {
                who,
                new_password,
                enabled,
                default_project,
            } => {
                let mut body = json!({});
                if let Some(p) = new_password {
                    body["password"] = json!(p);
                }
                if let Some(e) = enabled {
                    body["enabled"] = json!(e);
                }
                if let Some(p) = default_project {
                    body["default_project"] = json!(p);
                }
                let doc = api
                    .send(Req::new(
                        reqwest::Method::PATCH,
                        &format!("{base}/users/{}", seg(&who)),
                        Some(body),
                    ))
                    .await?
                    .into_json()?;
                print_one(out, &doc, USER_COLS, &[]);
                Ok(())
            }
            UsersCommand::Delete { who } => {
                api.send(Req::delete(&format!("{base}/users/{}", seg(&who))))
                    .await?;
                println!("deleted user {who}");
                Ok(())
            }
        },
        IdentityCommand::Roles(cmd) => match cmd {
            RolesCommand::List {
                of_user,
                on_project,
            } => {
                let q = query(&[("user", &of_user), ("project", &on_project)]);
                let doc = api
                    .send(Req::get(&format!("{base}/role-assignments{q}")))
                    .await?
                    .into_json()?;
                print_list(out, &doc, "role_assignments", ROLE_COLS)
            }
            RolesCommand::Grant { who, project, role } => {
                let path = format!(
                    "{base}/projects/{}/users/{}/roles/{}",
                    seg(&project),
                    seg(&who),
                    seg(&role)
                );
                let doc = api
                    .send(Req::new(reqwest::Method::PUT, &path, None))
                    .await?
                    .into_json()?;
                print_one(out, &doc, ROLE_COLS, &[]);
                Ok(())
            }
            RolesCommand::Revoke { who, project, role } => {
                let path = format!(
                    "{base}/projects/{}/users/{}/roles/{}",
                    seg(&project),
                    seg(&who),
                    seg(&role)
                );
                api.send(Req::delete(&path)).await?;
                println!("revoked {role} on {project} from {who}");
                Ok(())
            }
        },
        IdentityCommand::AccessKeys(cmd) => {
            credentials(
                &api,
                out,
                &format!("{base}/access-keys"),
                "access_keys",
                cmd,
            )
            .await
        }
        IdentityCommand::ApiKeys(cmd) => {
            credentials(&api, out, &format!("{base}/api-keys"), "api_keys", cmd).await
        }
        IdentityCommand::Tokens(cmd) => match cmd {
            TokensCommand::List { of_user } => {
                let q = query(&[("user", &of_user)]);
                let doc = api
                    .send(Req::get(&format!("{base}/tokens{q}")))
                    .await?
                    .into_json()?;
                print_list(out, &doc, "tokens", TOKEN_COLS)
            }
            TokensCommand::Issue {
                who,
                in_project,
                expires_in,
            } => {
                let mut body = json!({"user": who});
                if let Some(p) = in_project {
                    body["project"] = json!(p);
                }
                if let Some(s) = expires_in {
                    body["expires_in_secs"] = json!(s);
                }
                let doc = api
                    .send(Req::post(&format!("{base}/tokens"), Some(body)))
                    .await?
                    .into_json()?;
                print_one(out, &doc, TOKEN_COLS, &[("token", "token")]);
                Ok(())
            }
            TokensCommand::Revoke { id } => {
                api.send(Req::delete(&format!("{base}/tokens/{}", seg(&id))))
                    .await?;
                println!("revoked token {id}");
                Ok(())
            }
        },
    }
}

async fn credentials(
    api: &crate::cli::Api,
    out: Output,
    path: &str,
    key: &str,
    cmd: CredentialCommand,
) -> anyhow::Result<()> {
    let aksk = key == "access_keys";
    let cols = if aksk { AK_COLS } else { APIKEY_COLS };
    match cmd {
        CredentialCommand::List { of_user } => {
            let q = query(&[("user", &of_user)]);
            let doc = api
                .send(Req::get(&format!("{path}{q}")))
                .await?
                .into_json()?;
            print_list(out, &doc, key, cols)
        }
        CredentialCommand::Create {
            who,
            in_project,
            description,
        } => {
            let mut body = json!({"user": who, "description": description});
            if let Some(p) = in_project {
                body["project"] = json!(p);
            }
            let doc = api.send(Req::post(path, Some(body))).await?.into_json()?;
            let secrets: &[(&str, &str)] = if aksk {
                &[("secret key", "secret_key")]
            } else {
                &[("api key", "key")]
            };
            print_one(out, &doc, cols, secrets);
            Ok(())
        }
        CredentialCommand::Delete { id } => {
            api.send(Req::delete(&format!("{path}/{}", seg(&id))))
                .await?;
            println!("deleted {id}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser, Debug)]
    struct TestCli {
        #[command(subcommand)]
        cmd: TestCmd,
    }
    #[derive(clap::Subcommand, Debug)]
    enum TestCmd {
        Identity(IdentityArgs),
    }

    #[test]
    fn commands_parse_with_global_credentials() {
        let cli = TestCli::try_parse_from([
            "drplane",
            "identity",
            "roles",
            "grant",
            "alice",
            "proj-a",
            "member",
            "--user",
            "admin",
            "--password",
            "pw",
            "--login-project",
            "admin",
        ])
        .expect("parse");
        let TestCmd::Identity(a) = cli.cmd;
        assert_eq!(a.conn.user.as_deref(), Some("admin"));
        assert_eq!(a.conn.login_project.as_deref(), Some("admin"));
        assert!(matches!(
            a.command,
            IdentityCommand::Roles(RolesCommand::Grant { ref who, ref project, ref role })
                if who == "alice" && project == "proj-a" && role == "member"
        ));
        let cli = TestCli::try_parse_from([
            "drplane",
            "identity",
            "tokens",
            "issue",
            "demo",
            "--expires-in",
            "2",
            "--token",
            "t",
        ])
        .expect("parse");
        let TestCmd::Identity(a) = cli.cmd;
        assert_eq!(a.conn.token.as_deref(), Some("t"));
        let cli = TestCli::try_parse_from([
            "drplane",
            "identity",
            "access-keys",
            "create",
            "cleo",
            "--user",
            "admin",
        ])
        .expect("parse");
        let TestCmd::Identity(a) = cli.cmd;
        assert_eq!(
            a.conn.user.as_deref(),
            Some("admin"),
            "the positional USER is not --user"
        );
        assert!(matches!(
            a.command,
            IdentityCommand::AccessKeys(CredentialCommand::Create { ref who, .. }) if who == "cleo"
        ));
        assert!(TestCli::try_parse_from(["drplane", "identity", "api-keys", "list"]).is_ok());
    }

    #[test]
    fn query_strings() {
        assert_eq!(query(&[("user", &None)]), "");
        assert_eq!(
            query(&[
                ("user", &Some("a b".into())),
                ("project", &Some("p".into()))
            ]),
            "?user=a%20b&project=p"
        );
    }
}
